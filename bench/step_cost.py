"""Where a round trip's milliseconds go on the server's event loop: each step of handling one gradient, timed.

For ResNet20 (0.27M), 11M and 25M parameters (OrMo, K=16, one torch thread as ps-server), the median time
of each step the server's loop thread runs for one gradient, with the project's own functions, in one
process (no gRPC: what gRPC itself costs is the echo's share, measured end to end by bench/throughput):

- receive: `ormo_ps.common.wire.parse_worker_message` of the whole message (a view of the tensor, no copy), or for a
  chunked tensor the pieces parsed and copied into place (`ormo_ps.common.transport.Receiver`, in a buffer used again);
- decode: the checks and the zero-copy tensor (`ormo_ps.common.codec.decode`);
- push: `ServerCore.push`: validation with the NaN/Inf check (one read of the gradient) and the rule's
  update (for OrMo: two model-sized in-place updates, plus a group opening every K gradients);
- answer: the Parameters message(s) (`ormo_ps.common.transport.Sender.parameters`: one copy of the parameters);
- books: the service's per-gradient record (`RunRecorder.gradient`).

The echo (bench/grpc_echo.py) runs receive and answer only. Writes bench/results/step_cost.{json,md}.

    python -m bench.step_cost                        # about a minute
    python -m bench.step_cost --sizes resnet20 --repeats 5 --out /tmp/step_cost   # a smoke run
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import harness
from ormo_ps.common.chunks import DEFAULT_CHUNK_BYTES, BufferPool
from ormo_ps.common.codec import decode
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.metrics import RunRecorder
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.common.wire import parse_worker_message
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import ServerCore

SIZES = {"resnet20": 269_722, "11M": 11_173_962, "25M": 25_557_032}
K = 16
STEPS = ("receive", "decode", "push", "answer", "books")


def _median_ms(step: Callable[[], object], repeats: int) -> float:
    step()  # warm: allocations, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(n: int, repeats: int, chunk_bytes: int) -> dict[str, float]:
    core = ServerCore(torch.randn(n) * 0.01, RunConfig(algo="ormo", workers=K, lr=0.01, momentum=0.9,
                                                       iterations=10**9))
    held = {w: 0 for w in core.start().workers}
    g = torch.randn(n) * 1e-4
    sender = Sender(chunk_bytes)
    messages = sender.gradient(g, 0, 0.5, 128)
    incoming = Receiver(BufferPool(), chunk_bytes)  # as the server's streams

    def receive() -> object:
        for raw in messages:
            whole = incoming.take(parse_worker_message(raw))
        return whole

    whole = parse_worker_message(Sender().gradient(g, 0, 0.5, 128)[0])
    state = {"i": 0}

    def push() -> object:
        w = state["i"] % K
        state["i"] += 1
        for d in core.push(w, g, held.pop(w)):
            for r in d.workers:
                held[r] = d.iteration_index
        return None

    for _ in range(K):  # one round first: every worker's state set up, groups opening as in a run
        push()
    recorder = RunRecorder(None, log_every=10**9, total_iterations=10**9, clock=time.monotonic, say=lambda *a: None,
                           epoch=0.0)
    return {
        "receive": _median_ms(receive, repeats),
        "decode": _median_ms(lambda: decode(whole.message.gradient.tensor, expected_numel=n,
                                            expected_dtype=torch.float32, copy=False, data=whole.tensor_data),
                             repeats),
        "push": _median_ms(push, max(repeats, K)),
        "answer": _median_ms(lambda: sender.parameters(core.w, 1, 0.0), repeats),
        "books": _median_ms(lambda: recorder.gradient(core.iteration, 0.0, 0.01, 0.5, 3, workers_connected=K,
                                                      gradients_rejected=0), repeats),
    }


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("step_cost", __doc__, out="step_cost")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {', '.join(SIZES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per step (default: by size)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # ps-server's default --threads
    tune_malloc()  # as ps-server: message-sized buffers below 32 MiB are used again, not faulted in afresh
    rows, results = [], []
    for size in args.sizes.split(","):
        n = SIZES[size]
        repeats = args.repeats or (400 if n < 10**6 else 15)
        ms = measure(n, repeats, DEFAULT_CHUNK_BYTES)
        server = sum(ms.values())
        echo = ms["receive"] + ms["answer"]
        results.append(dict(size=size, numel=n, repeats=repeats, ms=ms, server_ms=server, echo_ms=echo))
        rows.append([size, *(f"{ms[s]:.3f}" for s in STEPS), f"{server:.3f}", f"{echo:.3f}",
                     f"{server - echo:.3f}"])
        print(f"{size}: " + ", ".join(f"{s} {ms[s]:.3f} ms" for s in STEPS), flush=True)
    meta = harness.run_meta("step_cost", argv)
    result = dict(meta=meta, k=K, chunk_bytes=DEFAULT_CHUNK_BYTES, results=results)
    harness.save(Path(args.out), result, [
        "# Where a round trip's milliseconds go on the server's loop thread", "", *harness.meta_lines(meta),
        f"OrMo, K={K}, one torch thread; median of each step over its repetitions (tensors above 4 MiB chunked, "
        "as ps-server's default). The echo's share is receive + answer; everything gRPC itself does (HTTP/2, "
        "the copies into and out of Python bytes, the sockets) is outside these steps and the same for both.",
        "", harness.table(["size", *(f"{s} (ms)" for s in STEPS), "server (ms)", "echo (ms)",
                               "server - echo (ms)"], rows), ""])
    return result


if __name__ == "__main__":
    main()
