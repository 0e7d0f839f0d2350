"""Wall-clock comparison with real processes: OrMo against SSGDm and ASGD, K workers, hom. and het.

Each run is `ps-launch` (a server, K worker processes, an evaluator) into OUT/runs/<algo>-<setting>/;
the figures of test accuracy and training loss against wall-clock time and the table come from
`ps-plot`'s code. Heterogeneous: a quarter of the workers `--slowdown` times slower (real sleeps).

    python -m bench.wallclock                    # digits + MLP, K=16 (a few minutes on 2 cores)
    python -m bench.wallclock --dataset cifar10 --data-dir D --model small-cnn --batch-size 32 --epochs 2 \
        --lr 0.01 --momentum-lr 0.002 --warmup-epochs 0.2 --eval-every 0.25   # `make bench` (~15 min, 2 cores)
    python -m bench.wallclock --dataset cifar10 --data-dir D --model resnet20 --epochs 160   # a real cluster run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import harness
from ormo_ps.launcher.cli import main as launch
from ormo_ps.report.plots import write_figures
from ormo_ps.report.runs import find_runs, method_key, method_label
from ormo_ps.report.tables import paper_table


def main(argv: list[str] | None = None) -> None:
    p = harness.parser("wallclock", __doc__, out="wallclock")
    p.add_argument("--algos", default="asgd,ssgdm,ormo")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--settings", default="hom,het")
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--momentum-lr", type=float, default=None,
                   help="eta of the momentum methods (OrMo, SSGDm, ...); default: --lr")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--worker-nice", type=int, default=10,
                   help="nice level of the workers, so the server and the evaluator keep up on a small machine")
    p.add_argument("--eval-every", type=float, default=1.0)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    for setting in args.settings.split(","):
        for algo in args.algos.split(","):
            out = args.out / "runs" / f"{algo}-{setting}"
            flags = ["--algo", algo, "--workers", str(args.workers), "--dataset", args.dataset, "--model", args.model,
                     "--batch-size", str(args.batch_size), "--lr", str(lr_of(algo, args)), "--epochs", str(args.epochs),
                     "--warmup-epochs", str(args.warmup_epochs), "--worker-nice", str(args.worker_nice),
                     "--eval-every", str(args.eval_every), "--out", str(out), "-q"]
            if args.data_dir:
                flags += ["--data-dir", args.data_dir]
            if setting == "het":
                flags += ["--slow-workers", str(args.workers // 4), "--slowdown", str(args.slowdown)]
            print(f"{algo} {setting} ...", file=sys.stderr)
            launch(flags)  # its launch.json tells ps-plot which runs had slow workers
            for big in ("checkpoint.pt", "final.pt"):  # keep the committed results small: metrics and logs
                (out / big).unlink(missing_ok=True)
    runs = find_runs([args.out / "runs"])
    figures = write_figures(runs, args.out)
    meta = harness.run_meta("wallclock", argv) | dict(seconds=round(time.monotonic() - t0, 1))
    harness.write_json(args.out / "meta.json", meta)
    harness.write_markdown(args.out / "README.md", [
        "# Wall-clock comparison with real processes", "", *harness.meta_lines(meta),
        f"The server, {args.workers} workers and the evaluator share the machine's CPUs.  ",
        f"Recipe: {args.model} on {args.dataset}, batch {args.batch_size}, eta {args.lr}"
        + (f" for ASGD and {args.momentum_lr} for the momentum methods" if args.momentum_lr is not None else "")
        + f" (warm-up "
        f"{args.warmup_epochs:g} epochs), {args.epochs} epochs; evaluation every {args.eval_every:g} epochs (the "
        f"evaluator evaluates the newest parameters when it is free, so slow evaluations skip points); "
        f"het.: {args.workers // 4} of {args.workers} workers {args.slowdown:g}x slower (each sleeps "
        f"{args.slowdown - 1:g}x its own step time after each gradient); workers at nice {args.worker_nice}, so "
        f"that the server and the evaluator are not starved by {args.workers} workers on "
        f"{os.cpu_count()} cores.", "",
        "## Wall-clock seconds", "", time_table(runs), "",
        "## Final test accuracy (%)", "", paper_table(runs, "test_accuracy"), "",
        "## Final training loss", "", paper_table(runs, "train_loss"), "",
        "## Figures (time = wall-clock seconds since the server started)", "",
        *[f"![{f.stem}]({f.name})" for f in figures]])
    print((args.out / "README.md").read_text())


def lr_of(algo: str, args: argparse.Namespace) -> float:
    momentum = algo not in ("asgd", "ssgd")
    return args.momentum_lr if momentum and args.momentum_lr is not None else args.lr


def time_table(runs: list) -> str:
    """Seconds from the server's start to the end of training, and until the first evaluation at or above
    90% of the best final accuracy of all runs (a common target), per method and setting."""
    finals = [r.final_test_accuracy for r in runs if r.final_test_accuracy is not None]
    target = 0.9 * max(finals) if finals else None
    settings = sorted({r.setting for r in runs}, key=lambda s: s != "hom.")
    header = ["method"]
    for s in settings:
        header += [f"{s} to finish"] + ([f"{s} to {100 * target:.1f} % test accuracy"] if target else [])
    rows = []
    for algo in sorted({r.algo for r in runs}, key=method_key):
        cells = []
        for setting in settings:
            run = next((r for r in runs if r.algo == algo and r.setting == setting), None)
            finish = run.summary.get("time") if run else None
            cells.append("-" if finish is None else f"{finish:.0f}")
            if target:
                hit = next((e["time"] for e in (run.evals if run else []) if e["test_accuracy"] >= target), None)
                cells.append("not reached" if hit is None else f"{hit:.0f}")
        rows.append([method_label(algo), *cells])
    return harness.table(header, rows)


if __name__ == "__main__":
    main()
