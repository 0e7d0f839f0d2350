"""The batched simulator against one gradient at a time, on the CPU: wall time of the same runs.

Each configuration (model, batch B, K workers, iterations) is simulated twice with the same seed and
arrivals, `Simulator(batched=False)` and `Simulator(batched=True)` (alternating, the one-at-a-time run
first), OrMo with a quarter of the workers 4x slower, no evaluation; one torch thread. Reported: seconds,
applied gradients per second, batched calls and gradients computed (a batched run computes the outstanding
gradients ahead, so a run's end leaves up to K computed and unused: per computed gradient is the fair
throughput), and how far the final parameters of the two runs are apart, beside the yardstick of float
rounding: how far the one-at-a-time run with two torch threads (other summation orders in the
convolutions) ends from the one with one thread. Also the memory a batched call
needs per image (peak resident memory of fresh processes computing 2 and 8 workers' gradients), which sizes
the GPU runs. Writes bench/results/batched_sim.{json,md}; the analysis (the CPU default, the GPU estimate of
bench/paper_table.py) is bench/prose/batched_sim.md.

    python -m bench.batched_sim --data-dir /tmp/ormo-ps-cifar10          # CIFAR-10 images (about 15 min)
    python -m bench.batched_sim --quick --out /tmp/batched_sim           # synthetic data, seconds
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from bench import harness

# model, batch per worker, K, iterations, batch limit (workers per batched call; None: all outstanding)
CONFIGS = [
    ("mlp", 32, 16, 300, None), ("mlp", 32, 64, 300, None),
    ("strided-cnn", 32, 16, 300, None), ("strided-cnn", 32, 64, 300, None),
    # ResNet20's batched activations take about 5 MB per image on the CPU: 8 workers x 128 images per call.
    ("resnet20", 128, 16, 128, 8), ("resnet20", 128, 64, 128, 8),
]
QUICK = [("mlp", 32, 16, 60, None), ("strided-cnn", 32, 16, 60, None), ("resnet20", 16, 16, 20, 8)]

_MEMORY_PROBE = """
import sys, torch
from ormo_ps.common.data import make_synthetic, BatchStream, Draw
from ormo_ps.server.config import RunConfig
from ormo_ps.sim.batched import BatchedGradients
torch.set_num_threads(1)
model, batch, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = make_synthetic(train_size=4 * batch, test_size=1, input_shape=(3, 32, 32))
flat = RunConfig(model=model, dataset="synthetic", batch_size=batch, workers=n).initial_model(data, "cpu")
streams = [BatchStream(data, batch, k) for k in range(n)]
x, y = streams[0].take(Draw.cat([s.draw() for s in streams]))
BatchedGradients(flat.module, 1e-4).compute(flat.params.expand(n, -1).clone(), x.view(n, batch, 3, 32, 32),
                                            y.view(n, batch))
# VmHWM, the peak of this process's own memory: ru_maxrss would also count the copy of the (large) benchmark
# process that the fork before exec made.
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_bytes(model: str, batch: int, workers: int) -> int:
    """Peak resident memory of a fresh process that computes `workers` gradients in one batched call."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, model, str(batch), str(workers)], cwd=harness.REPO,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def simulate(dataset, model: str, batch: int, workers: int, iterations: int, batched: bool,
             batch_limit: int | None):
    from ormo_ps.server.config import RunConfig
    from ormo_ps.sim.simulator import ComputeTimeModel, Simulator

    run = RunConfig(algo="ormo", workers=workers, dataset=dataset.name, model=model, batch_size=batch, lr=0.01,
                    warmup_epochs=0.0, iterations=iterations, seed=0)
    timing = ComputeTimeModel(jitter=0.2, slow_workers=workers // 4, slowdown=4.0)
    sim = Simulator(run, timing, dataset=dataset, eval_every=None, final_eval=False, batched=batched,
                    batch_limit=batch_limit)
    start = time.perf_counter()
    result = sim.simulate()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("batched_sim", __doc__, out="batched_sim")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (default: synthetic 3x32x32 data)")
    p.add_argument("--quick", action="store_true", help="a few short configurations (a smoke run)")
    p.add_argument("--memory-model", default="resnet20", help="the model whose batched memory per image is measured")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from ormo_ps.common.data import load_dataset, make_synthetic

    if args.data_dir:
        dataset = load_dataset("cifar10", args.data_dir)
    else:
        dataset = make_synthetic(train_size=5000, test_size=100, input_shape=(3, 32, 32))
    rows, results = [], []
    for model, batch, workers, iterations, limit in (QUICK if args.quick else CONFIGS):
        one_s, one = simulate(dataset, model, batch, workers, iterations, False, None)
        batched_s, batched = simulate(dataset, model, batch, workers, iterations, True, limit)
        torch.set_num_threads(2)
        _, threads = simulate(dataset, model, batch, workers, iterations, False, None)
        torch.set_num_threads(1)
        computed = batched.summary["gradients_computed"]
        diff, yardstick = (float(torch.linalg.vector_norm(r.params - one.params) / torch.linalg.vector_norm(one.params))
                           for r in (batched, threads))
        r = dict(model=model, batch_size=batch, workers=workers, iterations=iterations, batch_limit=limit,
                 one_at_a_time_s=round(one_s, 2), batched_s=round(batched_s, 2),
                 batched_calls=batched.summary["batched_calls"], gradients_computed=computed,
                 ms_per_gradient_one=round(1e3 * one_s / iterations, 2),
                 ms_per_computed_gradient_batched=round(1e3 * batched_s / computed, 2),
                 speedup_per_computed_gradient=round((one_s / iterations) / (batched_s / computed), 2),
                 speedup_wall=round(one_s / batched_s, 2), params_relative_difference=diff,
                 params_relative_difference_two_threads=yardstick)
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
        rows.append((model, batch, workers, iterations, limit or "all", f"{one_s:.1f}", f"{batched_s:.1f}",
                     r["batched_calls"], computed, r["ms_per_gradient_one"], r["ms_per_computed_gradient_batched"],
                     f"**{r['speedup_per_computed_gradient']:.2f}x**", f"{r['speedup_wall']:.2f}x", f"{diff:.1e}",
                     f"{yardstick:.1e}"))
    memory_batch = 16 if args.quick else 128
    two, eight = peak_bytes(args.memory_model, memory_batch, 2), peak_bytes(args.memory_model, memory_batch, 8)
    per_image = (eight - two) / (6 * memory_batch)
    meta = harness.run_meta("batched_sim", argv) | dict(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), dataset=dataset.name)
    result = dict(meta=meta, results=results, memory=dict(model=args.memory_model, batch_size=memory_batch,
                                                          peak_bytes_2_workers=two, peak_bytes_8_workers=eight,
                                                          bytes_per_image=per_image))
    harness.save(args.out, result, [
        "# The batched simulator on the CPU", "", *harness.meta_lines(meta),
        f"torch {meta['torch']}, {meta['torch_threads']} thread; {dataset.name} data; OrMo, a quarter of the "
        "workers 4x slower, no evaluation; each configuration once one at a time, then batched.", "",
        harness.table(["model", "B", "K", "iterations", "workers per call", "one at a time (s)", "batched (s)",
                       "batched calls", "gradients computed", "ms/gradient, one at a time",
                       "ms/computed gradient, batched", "speed-up per gradient", "speed-up, wall",
                       "parameters apart: batched", "parameters apart: 2 threads"], rows), "",
        "Parameters apart: the relative distance of the final parameters from the one-at-a-time run's (1 thread); "
        "the last column is the same run one at a time with 2 threads, the size float rounding alone reaches.", "",
        f"Memory of a batched call ({args.memory_model}, batch {memory_batch}): peak resident "
        f"{two / 2**30:.2f} GiB for 2 workers, {eight / 2**30:.2f} GiB for 8: "
        f"**{per_image / 2**20:.1f} MiB per image**.", "",
        harness.prose("batched_sim")])
    return result


if __name__ == "__main__":
    main()
