"""The cost of one server update of each algorithm on one core, against the memory-bandwidth bound.

For each algorithm and model size: the median time of `ServerCore.push` (validation, OrMo's group
opening amortised over K, the rule's update, the parameter handed back), the bytes the update must
touch at least (each vector read or written once, float32), and those bytes divided by a measured copy
bandwidth. Also answers issue 3's question, whether the update math stalls the event loop enough to
move it to a thread: the loop is blocked for exactly this time per gradient.
Writes bench/results/update_cost.{json,md}.

    python bench/update_cost.py            # 0.27M (ResNet20), 11M, 25M parameters; K=16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.algorithms import ALGORITHMS  # noqa: E402
from server.core import CoreConfig, ServerCore  # noqa: E402
from server.schedule import LRSchedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Model-sized vectors each update must read or write at least once (g read; state read+write = 2).
MIN_VECTORS = {"asgd": 3, "ssgd": 3, "asgdm": 5, "shifted-momentum": 5, "ormo": 5, "ormo-da": 5, "ssgdm": 5,
               "smega2": 8}
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
    core = ServerCore(torch.zeros(n), CoreConfig(algo, k, LRSchedule(0.01), momentum=0.9))
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core)")
    p.add_argument("--out", type=Path, default=RESULTS / "update_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size, n in SIZES.items():
        bw = copy_bandwidth(n, args.repeats)
        for algo in ALGORITHMS:
            if ALGORITHMS[algo].default_scheduler == "sync":
                continue
            t = push_time(algo, n, args.workers, args.repeats)
            bound = MIN_VECTORS[algo] * n * 4 / bw
            rows.append(dict(size=size, numel=n, algo=algo, seconds=t, bound_seconds=bound, ratio_to_bound=t / bound,
                             copy_bandwidth_gbs=bw / 1e9))
            print(f"{size:>8} {algo:<16} {t * 1e3:8.3f} ms  bound {bound * 1e3:7.3f} ms", file=sys.stderr)
    for size in SIZES:
        asgd = next(r["seconds"] for r in rows if r["size"] == size and r["algo"] == "asgd")
        for r in rows:
            if r["size"] == size:
                r["ratio_to_asgd"] = r["seconds"] / asgd
    meta = dict(command="python bench/update_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.platform(),
                torch=torch.__version__, threads=args.threads, workers=args.workers, repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = ["# Cost of one server update", "", f"Command: `{meta['command']}`  ",
             f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, {args.threads} thread(s); "
             f"K={args.workers}; median of {args.repeats}.", "",
             "`ServerCore.push` per gradient (validation with the NaN check, the rule's update, OrMo's group "
             "opening amortised over K); the bound is the bytes the rule must touch at least "
             "(model-sized float32 vectors read or written once) over the measured copy bandwidth.", "",
             "| size | algorithm | push (ms) | bound (ms) | push / bound | push / ASGD push |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['algo']} | {r['seconds'] * 1e3:.3f} | {r['bound_seconds'] * 1e3:.3f} | "
                     f"{r['ratio_to_bound']:.2f} | {r['ratio_to_asgd']:.2f} |")
    bws = sorted({round(r['copy_bandwidth_gbs'], 2) for r in rows})
    lines += ["", f"Measured copy bandwidth: {', '.join(map(str, bws))} GB/s (by size).", "",
              "Reading the table:", "",
              "- Every rule runs at about its memory-bandwidth bound for the large sizes. OrMo must touch 5 "
              "model-sized vectors (read g; read and write u and w) against ASGD's 3, so its floor is 5/3 = 1.67x an "
              "ASGD update: the goal of at most 1.5x is below what the bytes allow. (The NaN check was 6x the update "
              "itself before `server/core.py: all_finite` replaced `isfinite(g).all()` by a finite-sum test.)",
              "- Thread or loop (issue 3): the update runs on the event loop, which is blocked for exactly the "
              "push time: about 0.4 ms for ResNet20, tens of ms for 11M-25M parameters; decoding a gradient of "
              "the same size costs about as much (see the codec measurements in bench/results/throughput.md). "
              "A dedicated thread would let the next decode overlap the update, not apply updates faster (there "
              "is one writer either way), so the update stays on the loop until the throughput benchmark shows "
              "the loop, not the transport, is the limit for large models."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
