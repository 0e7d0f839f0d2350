"""Delayed Nesterov (DN; Liu, Chhaparia, Douillard et al., "Asynchronous Local-SGD Training for Language
Modeling", arXiv 2401.09135; the reference is the `DelayedNesterovOptimizer` of the HALoS code).

Gradients are grouped by their arrival count, not by their iteration index (OrMo's groups): every N arrivals
their mean enters the momentum. It is the natural "OrMo without ordering" to compare OrMo with.
"""

from __future__ import annotations

from typing import Any

import torch

from ormo_ps.server.algorithms.base import UpdateRule, register


class DelayedNesterov(UpdateRule):
    """State: momentum `m`, the sum `D` of the gradients since the last momentum update, the arrival count `t`.
    Options: the buffer size N (`dn_buffer`, default K) and the momentum activation c (`dn_activation`,
    default 0). Per gradient g:

        D += g
        if (t + 1) % N == 0:  m = beta*m + D/N;  w -= eta*((1 - c*N + c)*beta*m + g/N);  D = 0
        else:                 w -= eta*(c*beta*m + g/N)
        t += 1

    Over one cycle of N arrivals the momentum is applied with weights c (N-1 times) and 1 - c*N + c (once):
    1 in all, whatever c, so the parameters before each flush are those of c = 0.
    """

    name = "dn"

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float, *, dn_buffer: int | None = None,
                 dn_activation: float = 0.0) -> None:
        super().__init__(w, num_workers, momentum)
        self.buffer_size = num_workers if dn_buffer is None else int(dn_buffer)
        if self.buffer_size < 1:
            raise ValueError(f"dn_buffer must be >= 1, got {dn_buffer}")
        self.activation = float(dn_activation)
        self.m = torch.zeros_like(w)
        self.sum = torch.zeros_like(w)  # D
        self.arrivals = 0  # t

    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        n, c, beta = self.buffer_size, self.activation, self.beta
        self.sum.add_(g)
        if (self.arrivals + 1) % n == 0:
            self.m.mul_(beta).add_(self.sum, alpha=1.0 / n)
            self.w.add_(self.m, alpha=-lr * (1.0 - c * n + c) * beta).add_(g, alpha=-lr / n)
            self.sum.zero_()
        else:
            if c:
                self.w.add_(self.m, alpha=-lr * c * beta)
            self.w.add_(g, alpha=-lr / n)
        self.arrivals += 1

    def growth(self, lr: float) -> tuple[float, float]:
        # |D| grows by |g|; |m| <= beta*|m| + |D|/N + |g|/N <= 2B + |g|; |w| gains eta*(|1-cN+c| + c)*(2B + |g|)
        # + eta*|g|/N.
        weight = abs(1.0 - self.activation * self.buffer_size + self.activation) + self.activation
        return 2.0 + 2.0 * abs(lr) * weight, 1.0 + abs(lr) * (weight + 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "sum": self.sum, "arrivals": self.arrivals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m.copy_(state["m"])
        self.sum.copy_(state["sum"])
        self.arrivals = int(state["arrivals"])


register("dn", DelayedNesterov, "async", "Delayed Nesterov: gradients grouped by arrival count (Liu et al. 2024)",
         label="Delayed Nesterov", paper_rank=9, options=("dn_buffer", "dn_activation"))
