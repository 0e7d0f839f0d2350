"""Many virtual workers' gradients in one call: each at its own parameter, on its own mini-batch.

Why the simulator may compute them ahead (`Simulator(batched=True)`): the arrival order does not depend on
gradient values, and every outstanding gradient is computed at a parameter already sent, so when an
arrival's gradient is not computed yet, every outstanding worker's gradient is computed in one call
(`compute_for`), each on that worker's next mini-batch, and kept until its arrival. A worker holds at most
one outstanding gradient (the core sends it parameters only after its gradient arrived), so each kept
gradient is the one its arrival applies: the same arrivals apply the same gradients in the same order as
one at a time, equal up to float rounding.

`BatchedGradients.compute(params, x, y)` takes n stacked flat parameter vectors `(n, P)` and n mini-batches
`(n, B, ...)` and returns what `ormo_ps.common.gradients.GradientComputer` returns for each of the n, computed
together: the model's forward is `torch.func.vmap`-ed over the n parameter vectors (`functional_call`), so a
linear layer becomes one batched matmul and a convolution one grouped convolution of n groups, and one
autograd backward of the summed losses gives every worker's gradient (the losses are independent, so the
gradient of their sum with respect to parameter vector i is worker i's gradient). Weight decay is added as
the worker adds it.

BatchNorm: the server keeps only trainable parameters and every evaluation recomputes the running
statistics, so a worker's forward in training mode only ever uses its own batch's statistics. The module
here has its BatchNorm layers' running statistics removed (`torch.func.replace_all_batch_norm_modules_`): in
training mode they then normalise with batch statistics only, per vmapped worker, which is exactly what the
one-at-a-time forward computes (it also updates running statistics that nothing reads).

Equal to one-at-a-time up to float rounding: batched matmuls and grouped convolutions sum in another order,
so the results differ in the last bits (and a ReLU whose input is within rounding of zero may switch, which
changes that unit's contribution): per gradient a relative difference of about 1e-7 (MLP) to 1e-4
(ResNet20), see tests/test_batched.py.

A model vmap cannot batch (in-place updates of its own buffers, data-dependent Python control flow, random
ops such as dropout, whose draws one-at-a-time takes from torch's global generator) raises an error naming
the simulator's `--one-at-a-time`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from ormo_ps.common.data import Draw


class BatchedGradients:
    """`compute(params (n, P), x (n, B, ...), y (n, B))` -> (gradients (n, P) of each mean loss plus
    `weight_decay * params`, losses (n,), finite (n,) bool: loss and gradient all finite), all on the device
    of `params`; one value is copied to the host (whether every gradient's sum is finite)."""

    def __init__(self, module: nn.Module, weight_decay: float) -> None:
        """`module`: the model (a `FlatModel`'s `.module`; its trainable parameters, in `parameters()` order, are
        the flat vector's pieces). A copy is used: `module` keeps its BatchNorm statistics."""
        module = copy.deepcopy(module)
        replace_all_batch_norm_modules_(module)
        module.train()
        self.module = module
        self.weight_decay = weight_decay
        # FlatModel's order: module.parameters() with requires_grad, which named_parameters() walks too.
        trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in trainable]
        self._shapes = [p.shape for _, p in trainable]
        self._sizes = [p.numel() for _, p in trainable]
        self.numel = sum(self._sizes)
        self._losses = vmap(self._loss)

    def _loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One worker's mean cross-entropy at flat parameter `flat` (under vmap: one row of the stack)."""
        params = {name: t.view(shape)
                  for name, shape, t in zip(self._names, self._shapes, flat.split(self._sizes), strict=True)}
        return F.cross_entropy(functional_call(self.module, params, (x,)), y)

    def compute(self, params: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = params.shape[0]
        if params.dim() != 2 or params.shape[1] != self.numel:
            raise ValueError(f"params must be (n, {self.numel}), got {tuple(params.shape)}")
        if x.shape[0] != n or y.shape[0] != n:
            raise ValueError(f"x and y must hold {n} mini-batches, got {x.shape[0]} and {y.shape[0]}")
        leaf = params.detach().requires_grad_()
        try:
            losses = self._losses(leaf, x, y)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise RuntimeError(f"this model cannot be batched over workers with torch.func.vmap ({e}); run the "
                               "simulator one gradient at a time (ps-sim --one-at-a-time)") from e
        (grads,) = torch.autograd.grad(losses.sum(), leaf)
        if self.weight_decay:
            grads.add_(params, alpha=self.weight_decay)
        losses = losses.detach()
        # As ormo_ps.common.codec.all_finite, per row: a finite sum proves a row finite in one read; only a non-finite
        # sum (a NaN or Inf, or finite values overflowing) needs the element-wise check.
        rows_finite = torch.isfinite(grads.sum(dim=1))
        if not bool(rows_finite.all()):
            rows_finite = torch.isfinite(grads).all(dim=1)
        return grads, losses, torch.isfinite(losses) & rows_finite

    def compute_for(self, workers: list[int], held: dict[int, tuple[torch.Tensor, int]], streams: list,
                    into: dict[int, tuple[torch.Tensor, float, bool]], limit: int | None = None) -> int:
        """The gradients of `workers`, each at the parameter it holds (`held[k][0]`) and on its stream's next
        mini-batch, into `into[k]` = (gradient, loss, finite), in calls of at most `limit` workers (None: one
        call); one copy to the host per call. Returns the number of calls."""
        limit = limit or len(workers)
        calls = 0
        for start in range(0, len(workers), limit):
            chunk = workers[start : start + limit]
            # One gather over the shared training data for all of them (each stream draws its own batch).
            x, y = streams[chunk[0]].take(Draw.cat([streams[k].draw() for k in chunk]))
            params = torch.stack([held[k][0] for k in chunk])
            grads, losses, finite = self.compute(params, x.view(len(chunk), -1, *x.shape[1:]), y.view(len(chunk), -1))
            for k, grad, loss, ok in zip(chunk, grads, losses.tolist(), finite.tolist(), strict=True):
                into[k] = (grad, loss, ok)
            calls += 1
        return calls
