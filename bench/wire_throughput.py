"""Throughput with a bfloat16 wire against float32: ps-server, the gRPC echo and torch RPC side by side in one run.

    python -m bench.wire_throughput             # ResNet20 K=16; 11M and 25M at K=1, 4, 16 (~20 minutes)
    python -m bench.wire_throughput --quick     # ResNet20 K=16 only, short windows (a smoke run)

bench/throughput's machinery (its groups, windows and medians: bench/results/throughput.md says how), with each
system twice: in float32 and with `--wire-dtype bfloat16` (`server-bf16`: ps-server rounds the parameters it
sends to bfloat16 and widens the bfloat16 gradients it receives; `echo-bf16`: the echo announces bfloat16 and
echoes what comes; the pushers send bfloat16 gradients, as ps-worker does when the Welcome says so;
`torch-rpc-bf16`: the torch RPC server's ranks send bfloat16 tensors and the server applies in float32, like
with like). Writes bench/results/wire_throughput.{json,md}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.throughput.measure import measure_k
from bench.throughput.plan import SIZES

SYSTEMS = ("server", "server-bf16", "echo", "echo-bf16", "torch-rpc", "torch-rpc-bf16")
# (K values, windows per system, minimum window seconds) per size.
PLAN = {"resnet20": ((16,), 3, 1.5), "11M": ((1, 4, 16), 2, 3.0), "25M": ((1, 4, 16), 2, 4.0)}
QUICK = {"resnet20": ((16,), 2, 1.0)}


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("wire_throughput", __doc__, out="wire_throughput")
    p.add_argument("--quick", action="store_true", help="ResNet20 K=16 only, short windows")
    p.add_argument("--sizes", default=None, help="comma-separated subset of resnet20, 11M, 25M")
    p.add_argument("--settle", type=float, default=0.3)
    p.add_argument("--one-at-a-time", default="25M:16",
                   help="SIZE:K points whose six systems run one after the other, each alone (comma-separated): "
                        "at 25M with K=16 each group holds ~6-8 GiB, and all six at once do not fit in memory")
    args = p.parse_args(argv)
    alone = {tuple(x.split(":")) for x in args.one_at_a_time.split(",") if x}
    plan = QUICK if args.quick else PLAN
    if args.sizes:
        plan = {s: PLAN[s] for s in args.sizes.split(",")}
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="ormo-wire-") as tmp:
        for size, (ks, reps, window) in plan.items():
            for k in ks:
                if (size, str(k)) in alone:  # each system alone, its own windows; rows merged
                    row = dict(k=k, systems={}, alone=True)
                    for system in SYSTEMS:
                        part, _ = measure_k(size, SIZES[size], k, reps, window, args.settle, (system,), Path(tmp),
                                            "never", log)
                        row["systems"].update(part["systems"])
                else:
                    row, _ = measure_k(size, SIZES[size], k, reps, window, args.settle, SYSTEMS, Path(tmp), "never",
                                       log)
                results.append(dict(size=size, numel=SIZES[size], **row))
    meta = harness.run_meta("wire_throughput", argv) | dict(seconds=round(time.monotonic() - t0, 1))
    render(args.out, meta, results)
    return dict(meta=meta, results=results)


def render(out: Path, meta: dict, results: list[dict]) -> None:
    """bench/results/wire_throughput.{json,md} from a run's (or merged runs') results."""

    def rate(r: dict, system: str) -> float | None:
        return r["systems"].get(system, {}).get("updates_per_s")

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}"

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}" if x < 100 else f"{x:.0f}"

    rows = []
    for r in results:
        rows.append((r["size"], f"{r['k']}{' (each alone)' if r.get('alone') else ''}",
                     *(fmt(rate(r, s)) for s in SYSTEMS),
                     ratio(rate(r, "server-bf16"), rate(r, "server")),
                     ratio(rate(r, "server-bf16"), rate(r, "torch-rpc")),
                     ratio(rate(r, "server-bf16"), rate(r, "torch-rpc-bf16"))))
    skipped = [f"- {r['size']} K={r['k']} {name}: {v.get('skipped') or v.get('note')}" for r in results
               for name, v in r["systems"].items() if v.get("skipped") or v.get("note")]
    harness.save(out, dict(meta=meta, results=results), [
        "# Throughput with a bfloat16 wire (ps-server, the gRPC echo, torch RPC)", "", *harness.meta_lines(meta),
        "Updates (round trips) per second, medians of alternating windows, all six systems side by side in one "
        "run for each (size, K) (bench/results/throughput.md has the method); a point marked *each alone* ran its "
        "systems one after the other, each with its own windows (all six at once do not fit in memory).", "",
        harness.table(("size", "K", "server f32", "server bf16", "echo f32", "echo bf16", "torch-rpc f32",
                       "torch-rpc bf16", "server bf16 / f32", "server bf16 / torch-rpc f32",
                       "server bf16 / torch-rpc bf16"), rows), "",
        *(["Not measured:", "", *skipped, ""] if skipped else []),
        harness.prose("wire_throughput") if (harness.PROSE / "wire_throughput.md").exists() else ""])


if __name__ == "__main__":
    main()
