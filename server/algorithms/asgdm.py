"""Naive ASGDm: heavy-ball momentum on the server, in the order gradients arrive."""

from __future__ import annotations

from typing import Any

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class NaiveMomentum(UpdateRule):
    """`u = beta*u + eta*g; w = w - u`, ignoring how stale `g` is."""

    name = "asgdm"

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float) -> None:
        super().__init__(w, num_workers, momentum)
        self.u = torch.zeros_like(w)

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        self.u.mul_(self.beta).add_(g, alpha=lr)
        self.w.sub_(self.u)

    def state_dict(self) -> dict[str, Any]:
        return {"u": self.u}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u.copy_(state["u"])


register("asgdm", NaiveMomentum, "async", "naive asynchronous SGD with momentum (arrival order)",
         label="naive ASGDm", paper_rank=2)
