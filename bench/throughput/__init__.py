"""Throughput of the real ps-server against the transport's ceiling and a torch.distributed.rpc server.

Three systems, driven side by side in one run, for each model size and number of workers K:

- `server`: the real `ps-server` (OrMo) in a subprocess, `python -m ormo_ps.server.cli ...` (ResNet20 on the
  synthetic data set), or `python -m bench.ps_server_sized` (the same CLI with a flat model of 11.2M /
  25.6M parameters registered, since the model registry has none that large), with K synthetic gradient
  pushers (`python -m bench.grad_pusher`: separate processes, raw Train streams, no model compute);
- `echo`: `python -m bench.grpc_echo`, a grpc.aio bidi server with the same service, options, messages
  and Train serializers (common/wire.py) and no server logic, driven by the same pushers: the round
  trips gRPC allows on this machine;
- `torch-rpc`: `python -m bench.torch_rpc_ps`, a parameter server on torch.distributed.rpc (TensorPipe
  over loopback TCP) as PyTorch's tutorials build one, with K worker ranks pushing the same gradients.

All three groups of processes are started first and paused (a flag in their control file: each pusher
finishes its round trip and holds); then measurement windows alternate between them (resume, settle,
count, pause), rotating the order every repetition, and the medians are compared. Counts come from the
servers (updates applied, read with GetStatus or from the torch server's counter) and from the pushers
(round trips, through a shared control file). Everything listens on 127.0.0.1; every process is killed
in a finally block.

    python -m bench.throughput            # full run, ~8 min: writes bench/results/throughput.{md,json}
    python -m bench.throughput --quick    # ~1 min: ResNet20, K=16, to runs/bench/throughput_quick.*

The modules: `plan` (sizes, K, windows, goals), `groups` (starting, pausing and stopping the processes
of one system), `measure` (measurement windows and the rates of one K), `profile` (py-spy on the
server), `report` (goals' verdicts and the Markdown), `cli` (the command). The report's hand-written
text is in bench/prose/throughput_*.md.
"""
