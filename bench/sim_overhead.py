"""The simulator's overhead: simulated gradients per second against plain single-process SGD.

Both loops compute the same model's gradients on the same mini-batches (size B) of the same data; the
simulator adds ServerCore (here OrMo with K virtual workers), the priority queue and loading each worker's
held parameter into the model. Runs alternate (plain, sim, plain, sim, ...) and the medians are compared.
Writes bench/results/sim_overhead.{json,md}. Goal: overhead under 10%.

    python -m bench.sim_overhead --data-dir /path/to/cifar10   # ResNet20, B=128, K=16
    python -m bench.sim_overhead --iterations 2 --repeats 1 --out /tmp/sim_overhead   # a smoke run
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench import harness
from ormo_ps.server.config import RunConfig
from ormo_ps.common.data import BatchStream, load_dataset, make_synthetic
from ormo_ps.common.models import build_model
from ormo_ps.sim.simulator import Simulator


def plain_sgd(dataset, model_name: str, batch: int, iterations: int, seed: int) -> float:
    """Gradients per second of a plain torch loop: forward, backward, SGD-with-momentum step."""
    torch.manual_seed(seed)
    model = build_model(model_name, dataset.num_classes, dataset.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    stream = BatchStream(dataset, batch, seed)
    x, y = next(stream)  # warm-up (allocations, first-call costs)
    F.cross_entropy(model(x), y).backward()
    start = time.perf_counter()
    for _ in range(iterations):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return iterations / (time.perf_counter() - start)


def simulated(dataset, dataset_name: str, model_name: str, batch: int, iterations: int, workers: int, seed: int) -> float:
    run = RunConfig(algo="ormo", workers=workers, dataset=dataset_name, model=model_name, batch_size=batch,
                    lr=0.01, iterations=iterations + 1, seed=seed)
    sim = Simulator(run, dataset=dataset, eval_every=None, final_eval=False)
    return sim.simulate().summary["gradients_per_second"]


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("sim_overhead", __doc__, out="sim_overhead")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 directory (default: synthetic 3x32x32 data)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=16, help="the simulator's virtual workers")
    p.add_argument("--iterations", type=int, default=40, help="gradients per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of both loops")
    args = p.parse_args(argv)
    if args.data_dir:
        dataset, name = load_dataset("cifar10", args.data_dir), "cifar10"
    else:
        dataset, name = make_synthetic(train_size=5000, test_size=500, input_shape=(3, 32, 32)), "synthetic"
    plain, sim = [], []
    for r in range(args.repeats):
        plain.append(plain_sgd(dataset, args.model, args.batch_size, args.iterations, r))
        sim.append(simulated(dataset, name, args.model, args.batch_size, args.iterations, args.workers, r))
        print(f"repeat {r}: plain {plain[-1]:.2f} grad/s, simulator {sim[-1]:.2f} grad/s", file=sys.stderr)
    plain_med, sim_med = statistics.median(plain), statistics.median(sim)
    overhead = plain_med / sim_med - 1
    meta = harness.run_meta("sim_overhead", argv) | dict(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), model=args.model, dataset=name,
        batch_size=args.batch_size, workers=args.workers, iterations=args.iterations, repeats=args.repeats)
    result = dict(meta=meta, plain_gradients_per_second=plain, simulator_gradients_per_second=sim,
                  plain_median=plain_med, simulator_median=sim_med, overhead=overhead, goal="overhead < 10%",
                  goal_met=overhead < 0.10)
    harness.save(args.out, result, [
        "# Simulator overhead", "", *harness.meta_lines(meta),
        f"torch {meta['torch']}, {meta['torch_threads']} threads.  ",
        f"{args.model}, batch {args.batch_size}, {name} data; simulator: OrMo with K={args.workers} virtual "
        f"workers; {args.iterations} gradients per measurement, {args.repeats} alternating repeats.", "",
        harness.table(("loop", "gradients/s (median)", "all repeats"),
                      [(label, f"{statistics.median(v):.3f}", ", ".join(f"{x:.3f}" for x in v))
                       for label, v in (("plain single-process SGD", plain), ("simulator", sim))]), "",
        f"Overhead: **{overhead * 100:.1f}%** (goal: under 10%; {'met' if overhead < 0.10 else 'missed'})."])
    print(json.dumps(dict(overhead=overhead, plain=plain_med, sim=sim_med)))
    return result


if __name__ == "__main__":
    main()
