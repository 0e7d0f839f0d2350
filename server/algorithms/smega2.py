"""SMEGA2 (Cohen, Hakimi, Schuster, ICPP 2022): momentum with an estimate of the future parameter."""

from __future__ import annotations

from typing import Any

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class SMEGA2(UpdateRule):
    """State: `theta` (the core's `w`), buffer `v`, accumulator `G`, counter `s` modulo N = K.

    Per gradient: `s = (s+1) mod N; G += g; delta = g + beta*v` (v before any update);
    when `s == 0`: `v = beta*v + G/N; G = 0`; `theta -= eta*delta`.
    The worker is sent the estimate `e = theta - eta*beta*(s/N)*G - eta*beta*(N + s*(beta-1))*v`.
    """

    name = "smega2"

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float) -> None:
        super().__init__(w, num_workers, momentum)
        self.v = torch.zeros_like(w)
        self.accumulated = torch.zeros_like(w)  # G
        self.step = 0  # s
        self._estimate = torch.empty_like(w)

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        n = self.num_workers
        self.step = (self.step + 1) % n
        self.accumulated.add_(g)
        # theta -= eta * (g + beta*v) with v as it was before this gradient
        self.w.add_(g, alpha=-lr).add_(self.v, alpha=-lr * self.beta)
        if self.step == 0:
            self.v.mul_(self.beta).add_(self.accumulated, alpha=1.0 / n)
            self.accumulated.zero_()

    def params_to_send(self, lr: float) -> torch.Tensor:
        n, s, beta = self.num_workers, self.step, self.beta
        e = self._estimate
        torch.add(self.w, self.v, alpha=-lr * beta * (n + s * (beta - 1)), out=e)
        if s:
            e.add_(self.accumulated, alpha=-lr * beta * s / n)
        return e

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v, "accumulated": self.accumulated, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v.copy_(state["v"])
        self.accumulated.copy_(state["accumulated"])
        self.step = int(state["step"])


register("smega2", SMEGA2, "async", "SMEGA2: momentum with an estimate of the future parameter", label="SMEGA2",
         paper_rank=4)
