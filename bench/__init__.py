"""Benchmarks of OrMo-PS and their results (bench/results/).

Not part of the installed package: run each from the repository root as `python -m bench.NAME --help`.
"""
