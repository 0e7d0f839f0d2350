"""OrMo against naive ASGDm (and ASGD) with K=16 on a small real data set, across learning rates.

Naive ASGDm puts stale gradients into the momentum in arrival order; with K=16 its effective step grows
until it becomes unstable, while OrMo orders them by iteration index. Writes
bench/results/stability.{json,md}.

    python bench/stability.py            # digits, MLP, K=16, 3 seeds (about a minute on 2 cores)
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

from common.config import RunConfig  # noqa: E402
from common.data import load_dataset  # noqa: E402
from sim.simulator import ComputeTimeModel, Simulator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default="asgd,asgdm,ormo,ormo-da")
    p.add_argument("--lrs", default="0.005,0.01,0.02,0.03")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS / "stability")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset = load_dataset("digits")
    algos, lrs = args.algos.split(","), [float(x) for x in args.lrs.split(",")]
    rows = []
    t0 = time.monotonic()
    for lr in lrs:
        for algo in algos:
            losses, accs, diverged = [], [], 0
            for seed in range(args.seeds):
                run = RunConfig(algo=algo, workers=args.workers, dataset="digits", model="mlp",
                                batch_size=args.batch_size, lr=lr, momentum=0.9, epochs=args.epochs, seed=seed)
                s = Simulator(run, ComputeTimeModel(jitter=0.2), dataset=dataset, eval_every=None).simulate().summary
                if s["diverged"]:
                    diverged += 1
                    losses.append(float("inf"))
                    accs.append(0.1)
                else:
                    losses.append(s["final_train_loss"])
                    accs.append(s["final_test_accuracy"])
            finite = [x for x in losses if x != float("inf")]
            row = dict(lr=lr, algo=algo, train_loss_mean=statistics.fmean(finite) if finite else None,
                       train_loss_max=max(losses), test_accuracy_mean=statistics.fmean(accs), diverged_runs=diverged,
                       seeds=args.seeds, train_losses=losses, test_accuracies=accs)
            rows.append(row)
            print(f"lr {lr:<5} {algo:<8} train loss {row['train_loss_mean']} test acc {row['test_accuracy_mean']:.4f} "
                  f"diverged {diverged}/{args.seeds}", file=sys.stderr)
    meta = dict(command="python bench/stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.platform(),
                cpus=torch.get_num_threads(), torch=torch.__version__, seconds=round(time.monotonic() - t0, 1),
                setup=f"digits (1500 train / 297 test), mlp, K={args.workers}, batch {args.batch_size}, "
                      f"{args.epochs} epochs, beta 0.9, weight decay 1e-4, eta decayed x0.1 at 50%/75%, "
                      "compute-time jitter 0.2, final train loss = mean mini-batch loss of the last epoch")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1,
                                                          default=lambda x: None) + "\n")
    lines = [f"# OrMo vs naive ASGDm: stability across learning rates", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']}, "
             f"torch {meta['torch']}; took {meta['seconds']} s.  ", f"Setup: {meta['setup']}.", "",
             "| eta | method | final train loss (mean over seeds) | worst seed | test accuracy | diverged |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mean = "-" if r["train_loss_mean"] is None else f"{r['train_loss_mean']:.4f}"
        worst = "diverged" if r["train_loss_max"] == float("inf") else f"{r['train_loss_max']:.4f}"
        lines.append(f"| {r['lr']} | {r['algo']} | {mean} | {worst} | {r['test_accuracy_mean']:.4f} | "
                     f"{r['diverged_runs']}/{r['seeds']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
