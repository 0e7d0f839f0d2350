"""The batched simulator on a GPU against one gradient at a time on the same GPU: a smoke test before the table.

    python -m bench.cuda_smoke --data-dir D --device cuda      # ResNet20 on CIFAR-10, a few hundred iterations
    python -m bench.cuda_smoke --device cpu --iterations 20    # the same code on the CPU (synthetic data)

What tests/test_batched.py proves on the CPU, on the GPU at the paper's scale (ResNet20, batch 128, K=16):

- The gradients: 16 workers' gradients at 16 different parameter vectors, computed in one batched call and one
  at a time (the simulator's GradientComputer path), on the device: equal to float64 rounding in float64, and
  within 1e-2 of each other's norm in float32 with TF32 off (float32 ResNet20 gradients are good to ~1e-3).
- A run (OrMo, a quarter of the workers 4x slower, a few hundred iterations) one gradient at a time and
  batched: the arrivals (iterations, staleness histogram, gradients per worker, virtual time) identical. The
  final parameters' distance is reported, not checked: float32 rounding differences grow over a run (on the
  CPU, CIFAR-10, batch 16: 7e-4 of the run's change after 10 iterations, 2-3 % after 30), so a whole run
  agrees to rounding only in float64, which the gradient check covers. The same run one at a time with TF32
  on (PyTorch's default for cuDNN convolutions, what the table runs in) gives the size rounding alone reaches.
Both modes are timed: images/s of gradients computed. Exit status 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench import harness



def gradient_checks(flat, dataset, workers: int, batch: int, device: str) -> dict:
    """The largest relative distance between batched and one-at-a-time gradients, in float64 and float32."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    from ormo_ps.common.data import BatchStream, Draw
    from ormo_ps.common.gradients import GradientComputer
    from ormo_ps.sim.batched import BatchedGradients

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(5)  # K different parameter vectors around w_0, as the workers of a run hold
    params = flat.params.detach().cpu() + 0.05 * flat.params.detach().abs().mean().cpu() * torch.randn(workers,
                                                                                                      flat.numel)
    streams = [BatchStream(dataset, batch, k) for k in range(workers)]
    x, y = streams[0].take(Draw.cat([s.draw() for s in streams]))
    x, y, params = x.view(workers, batch, *x.shape[1:]).to(device), y.view(workers, batch).to(device), params.to(device)
    worst = {}
    module64 = copy.deepcopy(flat.module).double().to(device)
    grads, _, _ = BatchedGradients(copy.deepcopy(module64), weight_decay=1e-4).compute(params.double(), x.double(), y)
    module64.train()
    worst["float64"] = 0.0
    for i in range(workers):
        nn.utils.vector_to_parameters(params[i].double(), module64.parameters())
        module64.zero_grad()
        F.cross_entropy(module64(x[i].double()), y[i]).backward()
        expected = torch.cat([p.grad.flatten() for p in module64.parameters()]) + 1e-4 * params[i].double()
        worst["float64"] = max(worst["float64"], float(torch.linalg.vector_norm(grads[i] - expected)
                                                       / torch.linalg.vector_norm(expected)))
    module32 = copy.deepcopy(flat.module).to(device)
    grads, _, _ = BatchedGradients(module32, weight_decay=1e-4).compute(params, x, y)
    flat.module.to(device)
    computer = GradientComputer(flat, 1e-4)
    worst["float32"] = max(float(torch.linalg.vector_norm(grads[i] - computer.compute(params[i], x[i], y[i])[0])
                                 / torch.linalg.vector_norm(grads[i])) for i in range(workers))
    return worst


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("cuda_smoke", __doc__, out="cuda_smoke")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 image folders or python batches (default: synthetic)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args(argv)
    from ormo_ps.common.data import load_dataset, make_synthetic
    from ormo_ps.server.config import RunConfig
    from ormo_ps.sim.simulator import ComputeTimeModel, Simulator

    if args.data_dir:
        dataset = load_dataset("cifar10", args.data_dir)
    else:
        dataset = make_synthetic(train_size=5000, test_size=100, input_shape=(3, 32, 32))
    run = RunConfig(algo="ormo", workers=args.workers, dataset=dataset.name, model=args.model,
                    batch_size=args.batch_size, lr=0.05, iterations=args.iterations, seed=1, warmup_epochs=0.0)
    timing = ComputeTimeModel(jitter=0.3, slow_workers=args.workers // 4, slowdown=4)

    def simulate(batched: bool, tf32: bool):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        sim = Simulator(run, timing, dataset=dataset, device=args.device, eval_every=None, final_eval=False,
                        batched=batched)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = sim.simulate()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        computed = result.summary.get("gradients_computed", args.iterations)
        return result, dict(batched=batched, tf32=tf32, seconds=round(seconds, 2), gradients_computed=computed,
                            batched_calls=result.summary.get("batched_calls"),
                            images_per_s=round(computed * args.batch_size / seconds),
                            final_train_loss=result.summary.get("final_train_loss"))

    flat = run.initial_model(dataset, args.device)
    gradients = gradient_checks(flat, dataset, args.workers, args.batch_size, args.device)
    simulate(True, False)  # warm-up: cuDNN's algorithm choice, the allocator, lazy module loading
    one, one_row = simulate(False, False)
    one_tf32, one_tf32_row = simulate(False, True)
    batched, batched_row = simulate(True, False)
    tf32, tf32_row = simulate(True, True)
    w0 = run.initial_model(dataset, "cpu").params
    change = float(torch.linalg.vector_norm(one.params.cpu() - w0))
    checks = {}
    for key in ("iterations", "staleness_histogram", "gradients_per_worker", "time"):
        checks[f"same {key}"] = all(one.summary[key] == r.summary[key] for r in (one_tf32, batched, tf32))

    def apart(r) -> float:
        return float(torch.linalg.vector_norm(r.params.cpu() - one.params.cpu())) / change

    distances = dict(one_at_a_time_tf32=apart(one_tf32), batched=apart(batched), batched_tf32=apart(tf32))
    checks["batched gradients equal to float64 rounding (1e-10)"] = gradients["float64"] <= 1e-10
    checks["batched gradients within 1e-2 in float32"] = gradients["float32"] <= 1e-2
    checks["finite"] = all(bool(torch.isfinite(r.params).all()) for r in (one, one_tf32, batched, tf32))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else harness.processor()
    meta = harness.run_meta("cuda_smoke", argv) | dict(torch=torch.__version__, device=device_name,
                                                         dataset=dataset.name)
    result = dict(meta=meta, run=dict(model=args.model, workers=args.workers, batch_size=args.batch_size,
                                      iterations=args.iterations, slow_workers=timing.slow_workers),
                  rows=[one_row, one_tf32_row, batched_row, tf32_row], relative_to_change=distances,
                  gradients_relative_difference=gradients,
                  checks=checks, passed=all(checks.values()))
    print(json.dumps(result), file=sys.stderr)
    harness.save(args.out, result, [
        "# The batched simulator on the GPU against one gradient at a time", "", *harness.meta_lines(meta),
        f"{device_name}, torch {torch.__version__}; {args.model}, batch {args.batch_size}, K={args.workers} "
        f"({timing.slow_workers} 4x slower), OrMo, {args.iterations} iterations, {dataset.name}.", "",
        harness.table(["mode", "TF32", "seconds", "gradients computed", "batched calls", "images/s", "final loss"],
                      [("batched" if r["batched"] else "one at a time", "on" if r["tf32"] else "off", r["seconds"],
                        r["gradients_computed"], r["batched_calls"] or "-", r["images_per_s"],
                        f"{r['final_train_loss']:.4f}" if r["final_train_loss"] is not None else "-")
                       for r in result["rows"]]), "",
        f"Gradients, batched against one at a time ({args.workers} workers at different parameters): largest "
        f"relative distance {gradients['float64']:.1e} in float64, {gradients['float32']:.1e} in float32.", "",
        f"Final parameters, distance from the one-at-a-time run (TF32 off) relative to its change from w_0: batched "
        f"{distances['batched']:.2e} (TF32 off), {distances['batched_tf32']:.2e} (TF32 on); one at a time with TF32 "
        f"on, the size rounding alone reaches: {distances['one_at_a_time_tf32']:.2e}.", "",
        *(f"- {'pass' if ok else 'FAIL'}: {name}" for name, ok in checks.items())])
    if not result["passed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
