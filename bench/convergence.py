"""The paper's comparison with the simulator: every asynchronous method, K in {16, 64}, hom. and het.

Each (method, K, setting, seed) is one `ps-sim` run into OUT/runs/<method>-K<k>-<setting>-s<seed>/; the
table (mean ± std over seeds, the paper's format) and the figures come from `ps-plot`'s code. Runs go in
parallel processes (one torch thread each). Variants:

    python bench/convergence.py --variant quick   # digits + MLP: a few minutes on 2 cores
    python bench/convergence.py --variant cpu     # CIFAR-10 subset + small CNN: the scaled-down recipe
    python bench/convergence.py --variant paper --data-dir D   # ResNet20, full CIFAR-10, 160 epochs (GPU)

Heterogeneous ("het."): a quarter of the workers are `--slow-factor` times slower (simulated time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["asgd", "asgdm", "shifted-momentum", "smega2", "ormo", "ormo-da"]

VARIANTS = {
    # name: dataset, model, train subset (None = all), batch, lr, epochs, warm-up epochs, description
    "quick": dict(dataset="digits", model="mlp", subset=None, batch_size=16, lr=0.01, epochs=10, warmup=0.0,
                  device="cpu"),
    # eta 0.002: at 0.01 every momentum method (effective step eta/(1-beta) = 0.1) stayed at chance on this
    # model while ASGD trained (bench/results/convergence-cpu-eta0.01/README.md).
    "cpu": dict(dataset="cifar10", model="small-cnn", subset=5000, batch_size=32, lr=0.002, epochs=6, warmup=0.5,
                device="cpu"),
    "paper": dict(dataset="cifar10", model="resnet20", subset=None, batch_size=128, lr=0.1, epochs=160, warmup=5.0,
                  device="auto"),
}


def one_run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from common.config import RunConfig
    from common.data import load_dataset
    from sim.simulator import ComputeTimeModel, Simulator

    dataset = load_dataset(spec["dataset"], spec["data_dir"])
    if spec["subset"]:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(dataset.num_train, generator=g)[: spec["subset"]]
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[idx], train_y=dataset.train_y[idx])
    run = RunConfig(algo=spec["algo"], workers=spec["workers"], dataset=spec["dataset"], model=spec["model"],
                    batch_size=spec["batch_size"], lr=spec["lr"], warmup_epochs=spec["warmup"],
                    epochs=spec["epochs"], seed=spec["seed"], data_dir=spec["data_dir"])
    timing = ComputeTimeModel(jitter=0.2, slow_fraction=0.25 if spec["het"] else 0.0,
                              slow_factor=spec["slow_factor"] if spec["het"] else 1.0)
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sim = Simulator(run, timing, dataset=dataset, out_dir=spec["out"], device=device,
                    eval_every=max(spec["epochs"] / 10, 1.0))
    summary = sim.simulate().summary
    (Path(spec["out"]) / "final.pt").unlink(missing_ok=True)  # keep the committed results small: metrics only
    return dict(name=Path(spec["out"]).name, accuracy=summary["final_test_accuracy"],
                loss=summary["final_train_loss"], wall=summary["wall_seconds"], diverged=summary["diverged"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="quick")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (original batches or image folders)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", default="16,64")
    p.add_argument("--settings", default="hom,het")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--slow-factor", type=float, default=4.0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    v = VARIANTS[args.variant]
    if v["dataset"] == "cifar10" and not args.data_dir:
        p.error(f"--variant {args.variant} needs --data-dir (CIFAR-10)")
    out = args.out or RESULTS / f"convergence-{args.variant}"
    specs = []
    for algo in args.methods.split(","):
        for k in (int(x) for x in args.workers.split(",")):
            for setting in args.settings.split(","):
                for seed in range(args.seeds):
                    name = f"{algo}-K{k}-{setting}-s{seed}"
                    specs.append(dict(v, algo=algo, workers=k, het=setting == "het", seed=seed,
                                      slow_factor=args.slow_factor, data_dir=args.data_dir,
                                      out=str(out / "runs" / name)))
    t0 = time.monotonic()
    print(f"{len(specs)} runs, {args.jobs} at a time, into {out}", file=sys.stderr)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_run, s) for s in specs]
        for i, f in enumerate(as_completed(futures), 1):
            r = f.result()
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            print(f"[{i}/{len(specs)}] {r['name']}: test accuracy {acc} train loss {r['loss']} "
                  f"({r['wall']:.0f}s){' DIVERGED' if r['diverged'] else ''}", file=sys.stderr)
    from report.plots import write_figures
    from report.runs import find_runs
    from report.tables import paper_table

    runs = find_runs([out / "runs"])
    figures = write_figures(runs, out)
    meta = dict(command="python bench/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.platform(),
                seconds=round(time.monotonic() - t0, 1), variant=args.variant, recipe=v, seeds=args.seeds,
                slow_factor=args.slow_factor)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    recipe = (f"{v['model']} on {v['dataset']}" + (f" (random {v['subset']}-image training subset)" if v['subset']
              else "") + f", batch {v['batch_size']} per worker, eta {v['lr']} (warm-up {v['warmup']} epochs, "
              f"x0.1 at 50% and 75%), beta 0.9, weight decay 1e-4, {v['epochs']} epochs; het.: a quarter of the "
              f"workers {args.slow_factor:g}x slower; compute-time jitter ±20%")
    (out / "README.md").write_text("\n".join([
        f"# The paper's comparison, variant `{args.variant}`", "",
        f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']}; took "
        f"{meta['seconds']} s.  ", f"Recipe: {recipe}.", "",
        "## Test accuracy (%)", "", paper_table(runs, "test_accuracy"), "",
        "## Final training loss (mean mini-batch loss of the last epoch)", "", paper_table(runs, "train_loss"), "",
        "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures], ""]))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
