"""The paper's comparison with the simulator: every asynchronous method, K in {16, 64}, hom. and het.

Each (method, K, setting, seed) is one `ps-sim` run into OUT/runs/<method>-K<k>-<setting>-s<seed>/; the
table (mean ± std over seeds, the paper's format) and the figures come from `ps-plot`'s code. Runs go in
parallel processes (one torch thread each). Variants:

    python -m bench.convergence --variant quick   # digits + MLP: a few minutes on 2 cores
    python -m bench.convergence --variant cpu     # CIFAR-10 subset + small CNN: the scaled-down recipe
    python -m bench.convergence --variant paper --data-dir D   # ResNet20, full CIFAR-10, 160 epochs (GPU)
    python -m bench.convergence --variant k64 --data-dir D     # tuned eta per method, 20,000 iterations (CPU)

Heterogeneous ("het."): a quarter of the workers are `--slow-factor` times slower (simulated time).

Runs go in column order (K, then hom./het.), so a study cut short by `--deadline` (seconds from the start:
a run still going then stops where it is, a run not started is skipped, the table shows what there is, with
unfinished runs marked) has whole columns. On a GPU (`--device cuda`, or `auto` where there is one) the
processes share the one device and each simulator computes its outstanding gradients batched
(`--batched`); `--epochs` shortens the variant (its warm-up scaled along) to fit a budget
(bench/paper_table.py).

Variants with an eta grid (`k64`) tune eta per method and setting as papers do: every grid value is run
with seed 0 on the training set minus a held-out validation split, the value with the best final
validation accuracy is kept (diverged runs never are), and seeds 1.. run at it. Test accuracy is reported
for the chosen value only; the choice never looks at the test set. Finished runs are skipped when the
study is started again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError, as_completed
from pathlib import Path

from bench import harness
METHODS = ["asgd", "asgdm", "shifted-momentum", "smega2", "ormo", "ormo-da"]
# The 2024-25 methods beside the paper's (issue #26): in the K=64 study, not in the paper's table.
SUCCESSORS = ["dn", "ringmaster"]
# OrMo's ablation (the paper's Table 4): a method name of the study, the algorithm `ormo` with the flag.
ABLATION = "ormo-vanilla"

VARIANTS = {
    # name: dataset, model, train subset (None = all), batch, lr, epochs, warm-up epochs, description
    "quick": dict(dataset="digits", model="mlp", subset=None, batch_size=16, lr=0.01, epochs=10, warmup=0.0,
                  device="cpu"),
    # eta 0.002: at 0.01 every momentum method (effective step eta/(1-beta) = 0.1) stayed at chance on this
    # model while ASGD trained (bench/results/convergence-cpu-eta0.01/README.md).
    "cpu": dict(dataset="cifar10", model="small-cnn", subset=5000, batch_size=32, lr=0.002, epochs=6, warmup=0.5,
                device="cpu"),
    # eta per family and K, not one for all: at eta 0.1 for every method (the first GPU table,
    # bench/results/paper_table_eta0.1/) each momentum method (effective step eta/(1-beta) = 1.0) diverged or
    # stalled and every K=64 run diverged or collapsed, ASGD's too. The values are the k64 study's
    # validation-chosen ones (batch 32: ASGD 0.03 / 0.003, momentum 0.003 / 0.0003 at K=16 / 64) scaled by
    # the batch (x4 for 128) and rounded to a decade: ASGD's eta is ten times the momentum methods' (the same
    # effective step) and K=64's a tenth of K=16's.
    "paper": dict(dataset="cifar10", model="resnet20", subset=None, batch_size=128, lr=None, epochs=160, warmup=5.0,
                  device="auto", eta={("asgd", 16): 0.1, ("asgd", 64): 0.01, ("momentum", 16): 0.01,
                                      ("momentum", 64): 0.001}),
    # bench/paper_table.py's smoke run: the paper variant's code at a size a CPU runs in seconds (ResNet20's
    # BatchNorm recalibration alone would take a minute per evaluation set of 24 runs on 2 cores).
    "paper-smoke": dict(dataset="digits", model="strided-cnn", subset=None, batch_size=16, lr=0.05, epochs=None,
                        iterations=40, warmup=0.0, eval_every=1.0, device="cpu"),
    # All 50,000 images (5,000 of them held out for choosing eta), 20,000 server iterations per run (14 epochs
    # of batch 32), strided-cnn: 2.9 ms per gradient on one core, so 168 runs fit in about 3 hours on 2 cores.
    # The grids span the stable range (found in pilot runs): gradients about K iterations stale keep
    # eta * curvature * K below a constant, so the K=64 grid sits a factor 3 below K=16's; a momentum
    # method's step is about eta / (1 - beta), ten times ASGD's, so its grid sits a decade lower.
    "k64": dict(dataset="cifar10", model="strided-cnn", subset=None, validation=5000, batch_size=32, lr=None,
                iterations=20000, epochs=None, warmup=0.5, eval_every=1.5, device="cpu",
                methods=[*METHODS, ABLATION, *SUCCESSORS],
                grid={("asgd", 16): [0.003, 0.01, 0.03, 0.1], ("asgd", 64): [0.001, 0.003, 0.01, 0.03],
                      ("momentum", 16): [0.0003, 0.001, 0.003, 0.01], ("momentum", 64): [0.0001, 0.0003, 0.001, 0.003],
                      # Delayed Nesterov applies g/N at once and the mean of N = K gradients through the momentum:
                      # a gradient's whole step is about eta / (N (1 - beta)), so its grid sits N (1 - beta)
                      # times above ASGD's (1.6x at K=16, 6.4x at K=64), around the momentum grid times K.
                      ("dn", 16): [0.005, 0.015, 0.05, 0.15], ("dn", 64): [0.006, 0.02, 0.06, 0.2]}),
    # The wire-dtype study (issue #25): the k64 recipe at the eta the k64 grid chose in float32 (ASGD 0.03 / 0.003,
    # OrMo and OrMo-DA 0.003 / 0.0003 at K=16 / 64, hom. and het. alike), so that runs differ only in the wire
    # (`--wire-dtype`); their float32 counterparts are the k64 study's own runs.
    "k64-wire": dict(dataset="cifar10", model="strided-cnn", subset=None, validation=5000, batch_size=32, lr=None,
                     iterations=20000, epochs=None, warmup=0.5, eval_every=1.5, device="cpu",
                     eta={("asgd", 16): 0.03, ("asgd", 64): 0.003, ("momentum", 16): 0.003, ("momentum", 64): 0.0003}),
}


def family_of(method: str) -> str:
    """Which eta grid a method takes: ASGD's (Ringmaster is ASGD that ignores stale gradients), Delayed
    Nesterov's own, or the momentum methods'."""
    return {"asgd": "asgd", "ringmaster": "asgd", "dn": "dn"}.get(method, "momentum")


def eta_grid(variant: dict, method: str, workers: int, key: str = "grid") -> list[float]:
    """The eta values tried for `method` with K=`workers` (the nearest K the grid names); with key="eta",
    the variant's one eta for them."""
    family = family_of(method)
    if not any(f == family for f, _ in variant[key]):
        family = "momentum"
    ks = sorted(k for f, k in variant[key] if f == family)
    return variant[key][(family, min(ks, key=lambda k: abs(k - workers)))]


def eta_for(variant: dict, method: str, workers: int) -> float:
    """The eta of a variant without a grid: its per-family `eta` where it has one, else its `lr`."""
    return eta_grid(variant, method, workers, "eta") if "eta" in variant else variant["lr"]


def _unfinished(name: str, status: str, **known) -> dict:
    """The result of a run that has no summary (not started, stopped at the deadline, failed)."""
    return dict(name=name, accuracy=None, val_accuracy=None, loss=None, wall=0.0, diverged=False, status=status) | known


def _from_summary(name: str, summary: dict, **extra) -> dict:
    """The result of a finished run, from its summary record."""
    return dict(name=name, accuracy=summary.get("final_test_accuracy"), val_accuracy=summary.get("final_val_accuracy"),
                loss=summary.get("final_train_loss"), wall=summary.get("wall_seconds") or 0.0,
                diverged=summary.get("diverged"), iterations=summary.get("iterations"), status="finished") | extra


def one_run(spec: dict) -> dict:
    name = Path(spec["out"]).name
    deadline = spec.get("deadline")
    if deadline is not None and time.time() >= deadline:
        return _unfinished(name, "not started")
    import torch

    torch.set_num_threads(1)
    from ormo_ps.server.config import RunConfig
    from ormo_ps.common.data import load_dataset, split_validation
    from ormo_ps.sim.simulator import ComputeTimeModel, Simulator

    dataset = load_dataset(spec["dataset"], spec["data_dir"])
    if spec["subset"]:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(dataset.num_train, generator=g)[: spec["subset"]]
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[idx], train_y=dataset.train_y[idx])
    if spec.get("validation"):
        dataset = split_validation(dataset, spec["validation"])
    algo = "ormo" if spec["algo"] == ABLATION else spec["algo"]
    run = RunConfig(algo=algo, workers=spec["workers"], dataset=spec["dataset"], model=spec["model"],
                    batch_size=spec["batch_size"], lr=spec["lr"], warmup_epochs=spec["warmup"],
                    epochs=spec["epochs"] or 1.0, iterations=spec.get("iterations"), seed=spec["seed"],
                    data_dir=spec["data_dir"], vanilla_sgd_step=spec["algo"] == ABLATION,
                    wire_dtype=spec.get("wire_dtype", "float32"))
    timing = ComputeTimeModel(jitter=0.2, slow_workers=round(0.25 * spec["workers"]) if spec["het"] else 0,
                              slowdown=spec["slow_factor"])
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sim = Simulator(run, timing, dataset=dataset, out_dir=spec["out"], device=device,
                    eval_every=spec.get("eval_every") or max(spec["epochs"] / 10, 1.0),
                    batched=spec.get("batched"), batch_limit=spec.get("batch_limit"))
    result = None
    while result is None:  # an epoch at a time when there is a deadline, so a run stops near it
        if deadline is not None and time.time() >= deadline:
            return _unfinished(name, f"unfinished at iteration {sim.core.iteration} of {sim.core.total_iterations}",
                               accuracy=sim.evals[-1]["test_accuracy"] if sim.evals else None,
                               wall=sim.wall_seconds, iterations=sim.core.iteration)
        result = sim.simulate(None if deadline is None else sim.core.iteration + sim.iters_per_epoch)
    summary = result.summary
    (Path(spec["out"]) / "final.pt").unlink(missing_ok=True)  # keep the committed results small: metrics only
    return _from_summary(name, summary)


def finished(out: str | Path) -> dict | None:
    """The summary of a run that already finished in `out` (a study started again skips it), else None."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        if '"event": "summary"' in line:
            return json.loads(line)
    return None


def run_all(specs: list[dict], jobs: int, label: str, deadline: float | None = None) -> list[dict]:
    """Run the specs (skipping finished ones) `jobs` at a time; returns one result per spec, in order. With a
    `deadline` (time.time()), runs stop there (see `one_run`), and processes that have not returned a minute
    later are ended: their runs count as unfinished."""
    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        done = finished(s["out"])
        if done is None:
            todo.append(s)
            continue
        results[s["out"]] = _from_summary(Path(s["out"]).name, done, earlier=True)
    print(f"{label}: {len(specs)} runs, {len(specs) - len(todo)} already done, {jobs} at a time", file=sys.stderr)
    t0 = time.monotonic()
    # Fresh processes (spawn), never forked ones: CUDA cannot be used in a forked child of a process that touched
    # it, and a forked child inherits its parent's gRPC objects (a test process's), whose finalizers were seen
    # spinning there for minutes in a fresh-clone CI run.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context)
    futures = {pool.submit(one_run, dict(s, deadline=deadline)): s for s in todo}
    try:
        for i, f in enumerate(as_completed(futures, timeout=None if deadline is None
                                           else max(deadline - time.time(), 0) + 60), 1):
            try:
                r = f.result()
            except Exception as e:  # noqa: BLE001 -- one failed run (out of memory, ...) does not end the study
                r = _unfinished(Path(futures[f]["out"]).name, f"failed: {type(e).__name__}: {e}")
            results[futures[f]["out"]] = r
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            val = "" if r.get("val_accuracy") is None else f" val {r['val_accuracy']:.4f}"
            left = (time.monotonic() - t0) / i * (len(todo) - i)
            status = "" if r["status"] == "finished" else f" ({r['status']})"
            print(f"[{i}/{len(todo)}] {r['name']}{status}: test accuracy {acc}{val} train loss {r['loss']} "
                  f"({r['wall']:.0f}s){' DIVERGED' if r['diverged'] else ''}; about {left / 60:.0f} min left",
                  file=sys.stderr)
    except TimeoutError:
        print("the deadline passed a minute ago: ending the runs still going", file=sys.stderr)
        for process in list(getattr(pool, "_processes", {}).values()):  # the pool's own worker processes
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown()
    for s in specs:
        results.setdefault(s["out"], _unfinished(Path(s["out"]).name, "ended at the deadline"))
    return [results[s["out"]] for s in specs]


def tune(v: dict, args, out: Path) -> tuple[list[dict], dict]:
    """Stage 1 (the eta grid, seed 0) and the choice per (method, K, setting); returns the specs of every
    run of the table (seed 0 is the grid run at the chosen eta) and the grid's results."""
    grid_specs = []
    for algo in args.methods.split(","):
        for k in (int(x) for x in args.workers.split(",")):
            for setting in args.settings.split(","):
                for lr in eta_grid(v, algo, k):
                    grid_specs.append(dict(v, algo=algo, workers=k, het=setting == "het", seed=0, lr=lr,
                                           slow_factor=args.slow_factor, data_dir=args.data_dir,
                                           cell=(algo, k, setting),
                                           out=str(out / "grid" / f"{algo}-K{k}-{setting}-eta{lr:g}-s0")))
    grid_results = run_all(grid_specs, args.jobs, "eta grid (seed 0, validation split)")
    grid: dict = {}
    for spec, r in zip(grid_specs, grid_results, strict=True):
        grid.setdefault(spec["cell"], []).append((spec["lr"], r, spec["out"]))
    chosen = {}
    table_specs = []
    for cell, tried in grid.items():
        ok = [(lr, r, o) for lr, r, o in tried if not r["diverged"] and r.get("val_accuracy") is not None]
        lr, _, grid_out = max(ok, key=lambda t: t[1]["val_accuracy"]) if ok else tried[0]
        chosen[cell] = lr
        algo, k, setting = cell
        for seed in range(args.seeds):
            name = f"{algo}-K{k}-{setting}-s{seed}"
            spec = dict(v, algo=algo, workers=k, het=setting == "het", seed=seed, lr=lr,
                        slow_factor=args.slow_factor, data_dir=args.data_dir, out=str(out / "runs" / name))
            if seed == 0 and not (out / "runs" / name).exists():
                shutil.copytree(grid_out, out / "runs" / name)  # the grid run at the chosen eta is seed 0
            table_specs.append(spec)
    return table_specs, {"grid": grid, "chosen": chosen}


def collapsed(train_loss: float | None) -> bool:
    """A run whose training loss ended at ln 10, an untrained 10-class model's (every variant's data set has
    10 classes): its outputs went uniform, an instability the divergence rule (a loss above ten times its
    first value) does not catch."""
    return train_loss is not None and abs(train_loss - math.log(10)) < 0.005


def grid_table(tuning: dict) -> str:
    """Validation accuracy (%) of every eta tried (seed 0); the chosen one in bold, divergence named."""
    def cell(m: str, k: int, s: str) -> str:
        parts = []
        for lr, r, _ in tuning["grid"].get((m, k, s), []):
            text = "diverged" if r["diverged"] else ("-" if r.get("val_accuracy") is None
                                                     else f"{100 * r['val_accuracy']:.1f}")
            if not r["diverged"] and collapsed(r.get("loss")):
                text += " (collapsed)"
            text = f"{lr:g}: {text}"
            parts.append(f"**{text}**" if lr == tuning["chosen"][(m, k, s)] else text)
        return "<br>".join(parts)

    return _method_table(tuning["grid"], cell)


def eta_table(tuning: dict) -> str:
    return _method_table(tuning["chosen"], lambda m, k, s: f"{tuning['chosen'][(m, k, s)]:g}")


def _method_table(cells, cell) -> str:  # noqa: ANN001
    """A row per method, a column per (K, setting) of the (method, K, setting) `cells`; `cell(m, k, s)` fills it."""
    columns = sorted({(k, s) for _, k, s in cells}, key=lambda g: (g[0], g[1] != "hom"))
    methods = sorted({c[0] for c in cells}, key=METHOD_ORDER_ALL.index)
    return harness.table(["method", *(f"{k} {s}." for k, s in columns)],
                         ([LABELS.get(m, m), *(cell(m, k, s) for k, s in columns)] for m in methods))


METHOD_ORDER_ALL = [*METHODS, *SUCCESSORS, ABLATION]
LABELS = {"asgd": "ASGD", "asgdm": "naive ASGDm", "shifted-momentum": "shifted momentum", "smega2": "SMEGA2",
          "ormo": "OrMo", "ormo-da": "OrMo-DA", "dn": "Delayed Nesterov", "ringmaster": "Ringmaster ASGD",
          ABLATION: "OrMo, vanilla SGD step"}


def main(argv: list[str] | None = None) -> None:
    p = harness.parser("convergence", __doc__)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="quick")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (original batches or image folders)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", default="16,64")
    p.add_argument("--settings", default="hom,het")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--slow-factor", type=float, default=4.0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/convergence-VARIANT")
    p.add_argument("--iterations", type=int, default=None, help="override the variant's run length (smoke tests)")
    p.add_argument("--epochs", type=float, default=None,
                   help="override the variant's epochs; its warm-up is scaled by the same factor")
    p.add_argument("--device", default=None, help="override the variant's device (cpu, cuda, auto)")
    p.add_argument("--batched", choices=["auto", "on", "off"], default="auto",
                   help="the simulators' batched gradients (auto: on a GPU)")
    p.add_argument("--batch-limit", type=int, default=None, help="at most this many workers' gradients per batched call")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="what gradients and parameters travel as (the simulator rounds as the service does)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from now: runs stop there, and the table is written with what there is")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    deadline = None if args.deadline is None else time.time() + args.deadline
    v = dict(VARIANTS[args.variant], batched={"auto": None, "on": True, "off": False}[args.batched],
             batch_limit=args.batch_limit, wire_dtype=args.wire_dtype)
    if args.iterations:
        v = dict(v, iterations=args.iterations)
    if args.epochs and v.get("epochs"):
        v = dict(v, epochs=args.epochs, warmup=v["warmup"] * args.epochs / v["epochs"], full_epochs=v["epochs"])
    if args.device:
        v = dict(v, device=args.device)
    if v["dataset"] == "cifar10" and not args.data_dir:
        p.error(f"--variant {args.variant} needs --data-dir (CIFAR-10)")
    out = args.out or harness.RESULTS / f"convergence-{args.variant}"
    tuning = None
    if "grid" in v:
        if args.methods == ",".join(METHODS):
            args.methods = ",".join(v["methods"])
        specs, tuning = tune(v, args, out)
    else:
        specs = []
        for algo in args.methods.split(","):
            for k in (int(x) for x in args.workers.split(",")):
                for setting in args.settings.split(","):
                    for seed in range(args.seeds):
                        name = f"{algo}-K{k}-{setting}-s{seed}"
                        specs.append(dict(v, algo=algo, workers=k, het=setting == "het", seed=seed,
                                          lr=eta_for(v, algo, k), slow_factor=args.slow_factor, data_dir=args.data_dir,
                                          out=str(out / "runs" / name)))
    specs.sort(key=lambda s: (s["workers"], s["het"]))  # column by column (stable: methods in order)
    results = run_all(specs, args.jobs, f"{len(specs)} runs into {out}", deadline)
    from ormo_ps.report.plots import write_figures
    from ormo_ps.report.runs import find_runs
    from ormo_ps.report.tables import paper_table

    seconds = time.monotonic() - t0
    # Every run once: the eta grid's, and the seeds' (a seed-0 run is the grid's chosen one, copied).
    grid_runs = [r for tried in (tuning or {}).get("grid", {}).values() for _, r, _ in tried]
    every_run = grid_runs + [r for r in results if not (grid_runs and r["name"].endswith("-s0"))]
    done = sum(r.get("iterations") or 0 for r in every_run if not r.get("earlier"))  # by this command
    earlier = sum(r.get("iterations") or 0 for r in every_run if r.get("earlier"))  # by an earlier one (skipped now)
    run_hours = sum(r.get("wall") or 0.0 for r in every_run) / 3600
    runs = find_runs([out / "runs"]) if any((out / "runs").rglob("metrics.jsonl")) else []
    figures = write_figures(runs, out) if runs else []
    meta = harness.run_meta("convergence", argv) | dict(
        seconds=round(seconds, 1), variant=args.variant, seeds=args.seeds,
        recipe=v | {key: {f"{f}, K={k}": g for (f, k), g in v[key].items()} for key in ("grid", "eta") if key in v},
        slow_factor=args.slow_factor, jobs=args.jobs, deadline_s=args.deadline,
        runs={r["name"]: r["status"] for r in results}, iterations_done=done, iterations_done_earlier=earlier,
        images_per_second=round(done * v["batch_size"] / seconds, 1) if done else None)
    harness.write_json(out / "meta.json", meta)
    data = f"{v['model']} on {v['dataset']}" + (f" (random {v['subset']}-image training subset)" if v["subset"]
                                                 else "")
    if v.get("validation"):
        data += f" (all {v['validation']} held-out images excepted: the validation split)"
    grids = "; ".join(f"{f}, K={k}: {', '.join(map(str, g))}" for (f, k), g in v.get("grid", {}).items())
    etas = "; ".join(f"{f}, K={k}: {e:g}" for (f, k), e in v.get("eta", {}).items())
    eta = (f"eta tuned per method and setting (grids: {grids})" if tuning
           else f"eta per method family and K ({etas})" if etas else f"eta {v['lr']}")
    length = f"{v['iterations']} server iterations" if v.get("iterations") else f"{v['epochs']:g} epochs"
    if v.get("full_epochs"):
        length += f" (the recipe's {v['full_epochs']:g}, shortened to fit the time; warm-up scaled alike)"
    recipe = (f"{data}, batch {v['batch_size']} per worker, {eta} (warm-up {v['warmup']:g} epochs, x0.1 at 50% and "
              f"75% of the run), beta 0.9, weight decay 1e-4, {length}; het.: a quarter of the workers "
              f"{args.slow_factor:g}x slower; compute-time jitter ±20%")
    tuned = [] if tuning is None else [
        "## eta chosen per method and setting (best final validation accuracy of the grid, seed 0)", "",
        eta_table(tuning), "", "## The eta grid: final validation accuracy (%), seed 0", "",
        "The chosen value is in bold. `diverged`: the training loss went non-finite or above ten times its "
        "first value; such a value is never chosen. `collapsed`: the training loss ended at ln 10 = 2.303, an "
        "untrained model's (its outputs went uniform): unstable too, though the loss stayed bounded.", "", grid_table(tuning), ""]
    device = v["device"] + (" (cuda where there is one)" if v["device"] == "auto" else "")
    gradients = {None: {"cpu": "one at a time"}.get(v["device"], "batched on a GPU, one at a time on the CPU"),
                 True: "batched", False: "one at a time"}
    how = (f"Simulator on {device}, gradients {gradients[v['batched']]}, {args.jobs} runs at a time: "
           f"{done:,} server iterations computed"
           + (f" ({done * v['batch_size'] / seconds:,.0f} images/s overall)" if done else "")
           + (f", {earlier:,} more by earlier invocations of the command (finished runs are not redone)"
              if earlier else "") + f"; {len(every_run)} runs, whose own wall times add up to {run_hours:.1f} hours.")
    cut = [f"- {r['name']}: {r['status']}" for r in results if r["status"] != "finished"]
    if cut:
        cut = ["## Runs that did not finish", "",
               "Their cells show the last evaluation, marked unfinished; runs never started have none.", "", *cut, ""]
    tables = ["## Test accuracy (%)", "", paper_table(runs, "test_accuracy"), "",
              "## Final training loss (mean mini-batch loss of the last epoch)", "", paper_table(runs, "train_loss"),
              ""] if runs else ["No run got far enough to be tabled.", ""]
    # The hand-written reading of a committed study (bench/prose/convergence-VARIANT.md), in its own report only.
    reading_name = f"convergence-{args.variant}"
    reading = ([harness.prose(reading_name), ""] if (harness.PROSE / f"{reading_name}.md").exists()
               and Path(out).resolve() == (harness.RESULTS / reading_name).resolve() else [])
    harness.write_markdown(out / "README.md", [
        f"# The paper's comparison, variant `{args.variant}`", "",
        *harness.meta_lines(meta), f"Recipe: {recipe}.", "", how, "", *tables, *reading, *cut,
        *tuned, "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures]])
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
