"""Shifted momentum (Giladi et al., ICLR 2020): one momentum buffer per worker, kept on the server."""

from __future__ import annotations

from typing import Any

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class ShiftedMomentum(UpdateRule):
    """`m_k = beta*m_k + eta*g` for the sending worker `k`; `w = w - m_k`. Memory: K+1 vectors."""

    name = "shifted-momentum"

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float) -> None:
        super().__init__(w, num_workers, momentum)
        # Allocated on a worker's first gradient, so a run whose workers never all report stays small.
        self.worker_momentum: dict[int, torch.Tensor] = {}

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        m = self.worker_momentum.get(worker)
        if m is None:
            m = self.worker_momentum[worker] = torch.zeros_like(self.w)
        m.mul_(self.beta).add_(g, alpha=lr)
        self.w.sub_(m)

    def state_dict(self) -> dict[str, Any]:
        return {f"m_{k}": m for k, m in sorted(self.worker_momentum.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.worker_momentum = {int(key[2:]): t.clone().to(self.w) for key, t in state.items()}


register("shifted-momentum", ShiftedMomentum, "async", "shifted momentum, one buffer per worker",
         label="shifted momentum", paper_rank=3)
