"""The cost of one server update of each algorithm on one core, against the memory-bandwidth bound.

For each algorithm and model size: the median time of `ServerCore.push` (validation, OrMo's group
opening amortised over K, the rule's update, the parameter handed back), the bytes the update must
touch at least (each vector read or written once, float32), and those bytes divided by a measured copy
bandwidth. Also answers issue 3's question, whether the update math stalls the event loop enough to
move it to a thread: the loop is blocked for exactly this time per gradient.
Writes bench/results/update_cost.{json,md}; the reading of the table below it is written by hand
(bench/prose/update_cost_reading.md).

    python -m bench.update_cost            # 0.27M (ResNet20), 11M, 25M parameters; K=16
    python -m bench.update_cost --sizes resnet20 --repeats 1 --out /tmp/update_cost   # a smoke run
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from bench import harness
from ormo_ps.server.algorithms import ALGORITHMS
from ormo_ps.server.config import RunConfig
from ormo_ps.common.wire_dtype import Scratch, to_wire
from ormo_ps.server.core import ServerCore
# Model-sized vectors each update must read or write at least once (g read; state read+write = 2).
MIN_VECTORS = {"asgd": 3, "ssgd": 3, "asgdm": 5, "shifted-momentum": 5, "ormo": 5, "ormo-da": 5, "ssgdm": 5,
               "smega2": 8, "dn": 7, "ringmaster": 3}
SIZES = {"resnet20": 269_722, "11M": 11_000_000, "25M": 25_000_000}


def copy_bandwidth(n: int, repeats: int) -> float:
    """Bytes per second of `dst.copy_(src)` (one read + one write of n float32)."""
    src, dst = torch.rand(n), torch.empty(n)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / statistics.median(times)


def push_time(algo: str, n: int, k: int, repeats: int) -> float:
    core = ServerCore(torch.zeros(n), RunConfig(algo=algo, workers=k, lr=0.01, momentum=0.9, lr_milestones=(),
                                                iterations=10**9))
    held = {w: 0 for w in core.start().workers}
    g = torch.rand(n) * 1e-3
    times = []
    for i in range(repeats + k):
        w = i % k
        t = time.perf_counter()
        for d in core.push(w, g, held.pop(w)):
            for r in d.workers:
                held[r] = d.iteration_index
        if i >= k:  # after one round, so every rule has its state allocated
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def wire_step_time(n: int, k: int, repeats: int, wire: torch.dtype) -> float:
    """One OrMo gradient as the server handles it on a `wire` run: the gradient that came as `wire` widened to
    float32, the push, and the parameters to send rounded to `wire` (float32: the push alone)."""
    core = ServerCore(torch.zeros(n), RunConfig(algo="ormo", workers=k, lr=0.01, momentum=0.9, lr_milestones=(),
                                                iterations=10**9))
    held = {w: 0 for w in core.start().workers}
    g_wire = (torch.rand(n) * 1e-3).to(wire)
    scratch = Scratch()  # as the service's: the conversions reuse their buffers
    times = []
    for i in range(repeats + k):
        w = i % k
        t = time.perf_counter()
        g = scratch.widen(g_wire)
        for d in core.push(w, g, held.pop(w)):
            to_wire(d.params, wire, "the parameters", scratch=scratch)
            for r in d.workers:
                held[r] = d.iteration_index
        if i >= k:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("update_cost", __doc__, out="update_cost")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core)")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {', '.join(SIZES)}")
    args = p.parse_args(argv)
    sizes = {size: SIZES[size] for size in args.sizes.split(",")}
    torch.set_num_threads(args.threads)
    rows = []
    for size, n in sizes.items():
        bw = copy_bandwidth(n, args.repeats)
        for algo in ALGORITHMS:
            if ALGORITHMS[algo].default_scheduler == "sync":
                continue
            t = push_time(algo, n, args.workers, args.repeats)
            bound = MIN_VECTORS[algo] * n * 4 / bw
            rows.append(dict(size=size, numel=n, algo=algo, seconds=t, bound_seconds=bound, ratio_to_bound=t / bound,
                             copy_bandwidth_gbs=bw / 1e9))
            print(f"{size:>8} {algo:<16} {t * 1e3:8.3f} ms  bound {bound * 1e3:7.3f} ms", file=sys.stderr)
    wire_rows = []
    for size, n in sizes.items():
        base = None
        for name, wire in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            t = wire_step_time(n, args.workers, args.repeats, wire)
            base = base or t
            wire_rows.append(dict(size=size, numel=n, wire_dtype=name, seconds=t, ratio_to_float32=t / base))
            print(f"{size:>8} ormo on a {name:<8} wire {t * 1e3:8.3f} ms", file=sys.stderr)
    for size in sizes:
        asgd = next(r["seconds"] for r in rows if r["size"] == size and r["algo"] == "asgd")
        for r in rows:
            if r["size"] == size:
                r["ratio_to_asgd"] = r["seconds"] / asgd
    meta = harness.run_meta("update_cost", argv) | dict(
        torch=torch.__version__, threads=args.threads, workers=args.workers, repeats=args.repeats)
    bws = sorted({round(r['copy_bandwidth_gbs'], 2) for r in rows})
    harness.save(args.out, dict(meta=meta, rows=rows, wire_rows=wire_rows), [
        "# Cost of one server update", "", *harness.meta_lines(meta),
        f"torch {meta['torch']}, {args.threads} thread(s); K={args.workers}; median of {args.repeats}.", "",
        "`ServerCore.push` per gradient (validation with the NaN check, the rule's update, OrMo's group "
        "opening amortised over K); the bound is the bytes the rule must touch at least "
        "(model-sized float32 vectors read or written once) over the measured copy bandwidth.", "",
        harness.table(("size", "algorithm", "push (ms)", "bound (ms)", "push / bound", "push / ASGD push"),
                      [(r["size"], r["algo"], f"{r['seconds'] * 1e3:.3f}", f"{r['bound_seconds'] * 1e3:.3f}",
                        f"{r['ratio_to_bound']:.2f}", f"{r['ratio_to_asgd']:.2f}") for r in rows]), "",
        f"Measured copy bandwidth: {', '.join(map(str, bws))} GB/s (by size).", "",
        "## The wire dtype's conversions (issue #25)", "",
        "An OrMo gradient on a run whose wire is bfloat16 or float16: the gradient widened to float32, the push, "
        "and the parameters rounded to the wire dtype to be sent (float32: the push alone). Median per gradient.",
        "", harness.table(("size", "wire dtype", "widen + push + round (ms)", "/ float32"),
                          [(r["size"], r["wire_dtype"], f"{r['seconds'] * 1e3:.3f}", f"{r['ratio_to_float32']:.2f}")
                           for r in wire_rows]), "",
        harness.prose("update_cost_reading")])
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
