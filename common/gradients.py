"""Computing one worker gradient: load the parameter, forward/backward a mini-batch, add weight decay.

Shared by the simulator's virtual workers and the real `ps-worker`, so both compute the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ormo_ps.common.models import FlatModel


class GradientComputer:
    """`compute(params, x, y)` returns (the flat gradient of the mean loss + weight_decay * params, loss)."""

    def __init__(self, flat_model: FlatModel, weight_decay: float) -> None:
        self.model = flat_model
        self.weight_decay = weight_decay
        flat_model.module.train()

    def compute(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The returned gradient is the model's live gradient buffer: use or copy it before the next call."""
        model = self.model
        model.load_(params)
        model.zero_grad_()
        loss = F.cross_entropy(model.module(x), y)
        loss.backward()
        grads = model.grads
        if self.weight_decay:
            grads.add_(model.params, alpha=self.weight_decay)
        return grads, float(loss.detach())
