"""Ordered Momentum (OrMo, Algorithm 2) and OrMo-DA: stale gradients enter the momentum by group."""

from __future__ import annotations

import math
from typing import Any

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


def gradient_group(iteration_index: int, num_workers: int) -> int:
    """The group of a gradient computed at `w_ite`: `ceil(ite / K)`, so group 0 holds those at `w_0`."""
    return -(-iteration_index // num_workers)


def delay_adaptive_lr(lr: float, delay: int, num_workers: int) -> float:
    """OrMo-DA's rate (the project's choice, see docs/algorithms.md): `eta` up to delay K, then `eta*K/tau`."""
    if delay <= num_workers:
        return lr
    return lr * num_workers / delay


class OrderedMomentum(UpdateRule):
    """OrMo. State: `u` (momentum of eta-scaled gradients) and `latest_group` (I).

    Before each gradient, when the waiting set is empty and `ceil(t/K) > I`, a new group opens:
    `w -= beta*u; u *= beta; I += 1`. A gradient of group `b = ceil(ite/K)`, `d = I - b` groups late,
    enters `u` with weight `beta^d` and `w` with `1 + beta + ... + beta^d`.
    `vanilla_sgd_step` is the paper's ablation: `w -= eta*g` in place of line 13.
    """

    name = "ormo"

    def __init__(
        self,
        w: torch.Tensor,
        num_workers: int,
        momentum: float,
        *,
        delay_adaptive: bool = False,
        vanilla_sgd_step: bool = False,
    ) -> None:
        super().__init__(w, num_workers, momentum)
        self.u = torch.zeros_like(w)
        self.latest_group = 0
        self.delay_adaptive = delay_adaptive
        self.vanilla_sgd_step = vanilla_sgd_step

    def open_group(self, iteration: int, waiting_set_empty: bool) -> None:
        if waiting_set_empty and gradient_group(iteration, self.num_workers) > self.latest_group:
            self.w.sub_(self.u, alpha=self.beta)
            self.u.mul_(self.beta)
            self.latest_group += 1

    def effective_lr(self, lr: float, iteration_index: int, iteration: int) -> float:
        if self.delay_adaptive:
            return delay_adaptive_lr(lr, iteration - iteration_index, self.num_workers)
        return lr

    def group_delay(self, iteration_index: int) -> int:
        """`d = I - b`: how many groups the gradient is late (never negative)."""
        return self.latest_group - gradient_group(iteration_index, self.num_workers)

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        d = self.group_delay(iteration_index)
        if d < 0:
            raise AssertionError(f"gradient group ahead of the latest group: d={d}")
        beta = self.beta
        self.u.add_(g, alpha=beta**d * lr)
        if self.vanilla_sgd_step:
            self.w.add_(g, alpha=-lr)
        else:
            # (1 - beta^(d+1)) / (1 - beta) = 1 + beta + ... + beta^d, written as a sum so beta=0 is exact
            self.w.add_(g, alpha=-math.fsum(beta**i for i in range(d + 1)) * lr)

    def state_dict(self) -> dict[str, Any]:
        return {"u": self.u, "latest_group": self.latest_group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u.copy_(state["u"])
        self.latest_group = int(state["latest_group"])


def _ormo_da(w: torch.Tensor, num_workers: int, momentum: float, **options: Any) -> OrderedMomentum:
    return OrderedMomentum(w, num_workers, momentum, delay_adaptive=True, **options)


_OPTIONS = ("vanilla_sgd_step",)
register("ormo", OrderedMomentum, "async", "Ordered Momentum", label="OrMo", paper_rank=5, options=_OPTIONS)
register("ormo-da", _ormo_da, "async", "Ordered Momentum with a delay-adaptive learning rate", label="OrMo-DA",
         paper_rank=6, options=_OPTIONS)
register("ssgdm", OrderedMomentum, "sync", "synchronous SGD with momentum (OrMo's lines, synchronous scheduler)",
         label="SSGDm", paper_rank=8)
