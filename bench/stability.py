"""OrMo against naive ASGDm (and ASGD) with K=16 on a small real data set, across learning rates.

Naive ASGDm puts stale gradients into the momentum in arrival order; with K=16 its effective step grows
until it becomes unstable, while OrMo orders them by iteration index. Writes
bench/results/stability.{json,md}.

    python -m bench.stability            # digits, MLP, K=16, 3 seeds (about a minute on 2 cores)
    python -m bench.stability --algos ormo --lrs 0.01 --seeds 1 --epochs 1 --out /tmp/stability   # a smoke run
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from bench import harness
from ormo_ps.server.config import RunConfig
from ormo_ps.common.data import load_dataset
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("stability", __doc__, out="stability")
    p.add_argument("--algos", default="asgd,asgdm,ormo,ormo-da", help="comma-separated algorithms")
    p.add_argument("--lrs", default="0.005,0.01,0.02,0.03", help="comma-separated learning rates (eta)")
    p.add_argument("--seeds", type=int, default=3, help="runs per (eta, algorithm)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--batch-size", type=int, default=32)
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
    meta = harness.run_meta("stability", argv) | dict(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), seconds=round(time.monotonic() - t0, 1),
        setup=f"digits (1500 train / 297 test), mlp, K={args.workers}, batch {args.batch_size}, "
              f"{args.epochs} epochs, beta 0.9, weight decay 1e-4, eta decayed x0.1 at 50%/75%, "
              "compute-time jitter 0.2, final train loss = mean mini-batch loss of the last epoch")
    header = ("eta", "method", "final train loss (mean over seeds)", "worst seed", "test accuracy", "diverged")
    cells = [(r["lr"], r["algo"], "-" if r["train_loss_mean"] is None else f"{r['train_loss_mean']:.4f}",
              "diverged" if r["train_loss_max"] == float("inf") else f"{r['train_loss_max']:.4f}",
              f"{r['test_accuracy_mean']:.4f}", f"{r['diverged_runs']}/{r['seeds']}") for r in rows]
    harness.save(args.out, dict(meta=meta, rows=rows), [
        "# OrMo vs naive ASGDm: stability across learning rates", "", *harness.meta_lines(meta),
        f"torch {meta['torch']}, {meta['torch_threads']} thread(s).  ", f"Setup: {meta['setup']}.", "",
        harness.table(header, cells)], default=lambda x: None)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
