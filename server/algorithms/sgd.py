"""Plain SGD step on the server: ASGD (asynchronous scheduler) and SSGD (synchronous scheduler)."""

from __future__ import annotations

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class PlainSGD(UpdateRule):
    """`w = w - eta * g` for every gradient, in arrival order."""

    name = "sgd"

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        self.w.add_(g, alpha=-lr)


register("asgd", PlainSGD, "async", "asynchronous SGD (Algorithm 1, option II)", label="ASGD", paper_rank=1)
register("ssgd", PlainSGD, "sync", "synchronous SGD (Algorithm 1, option I)", label="SSGD", paper_rank=7)
