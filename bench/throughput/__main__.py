from bench.throughput.cli import main

main()
