"""Ringmaster ASGD (Maranjyan, Tyurin, Richtarik, ICML 2025): ASGD that ignores gradients that are too stale.

With delay tau = t - ite of an arriving gradient:

    if tau < R:  w -= eta*g;  t += 1;  the worker is sent (w, t)
    else:        the gradient is discarded (t unchanged); the worker is sent the current (w, t)

R (`ringmaster_r`) defaults to K. The core does the discarding (`discards`): a discarded gradient is counted,
is no error, and does not count towards the run's length. Under the synchronous scheduler nothing is
discarded (a round has no stale gradients to ignore).

The paper's variant "with calculation stops" (a worker abandons its computation as soon as its delay reaches
R) is not built: the server would have to interrupt a worker mid-gradient with a message no client reads
today, and the simulator would have to model the computation time saved. What the server does instead is the
paper's plain Ringmaster: the stale gradient is computed, sent and ignored.
"""

from __future__ import annotations

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class Ringmaster(UpdateRule):
    """`w = w - eta * g` for gradients less than R iterations stale; the others are discarded."""

    name = "ringmaster"

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float, *, ringmaster_r: int | None = None) -> None:
        super().__init__(w, num_workers, momentum)
        self.r = num_workers if ringmaster_r is None else int(ringmaster_r)
        if self.r < 1:
            raise ValueError(f"ringmaster_r must be >= 1, got {ringmaster_r}")

    def discards(self, iteration_index: int, iteration: int) -> bool:
        return iteration - iteration_index >= self.r

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        self.w.add_(g, alpha=-lr)


register("ringmaster", Ringmaster, "async", "Ringmaster ASGD: ASGD that discards gradients R or more iterations "
         "stale (Maranjyan et al. 2025)", label="Ringmaster ASGD", paper_rank=10, options=("ringmaster_r",))
