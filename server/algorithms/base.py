"""The interface every update rule implements, and the registry that picks one by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ormo_ps.common.registry import lookup

SCHEDULERS = ("async", "sync")


class UpdateRule(ABC):
    """One server update rule. It owns the algorithm's state; the parameter `w` belongs to the core.

    The core calls, for each server iteration `t`:
    `open_group(t, waiting_set_empty)` (before the gradient is received: OrMo's lines 6-10),
    then `apply(g, iteration_index, t, worker, lr)`, then `params_to_send(lr)`.
    """

    name: ClassVar[str]

    def __init__(self, w: torch.Tensor, num_workers: int, momentum: float) -> None:
        self.w = w
        self.num_workers = num_workers
        self.beta = momentum

    def open_group(self, iteration: int, waiting_set_empty: bool) -> None:
        """Hook run before each gradient is received; only OrMo uses it."""

    @abstractmethod
    def apply(self, g: torch.Tensor, iteration_index: int, iteration: int, worker: int, lr: float) -> None:
        """Apply gradient `g`, computed at the parameter with `iteration_index`, as iteration `iteration`."""

    def params_to_send(self, lr: float) -> torch.Tensor:
        """The parameter a worker computes its next gradient at (SMEGA2 sends an estimate)."""
        return self.w

    def discards(self, iteration_index: int, iteration: int) -> bool:
        """Whether a valid gradient computed at `iteration_index`, arriving at `iteration`, is ignored (Ringmaster:
        too stale). The core then leaves the state and the iteration as they are and sends the worker the
        current parameters."""
        return False

    def growth(self, lr: float) -> tuple[float, float]:
        """(a, b): after one update every state magnitude is at most a*B + b*|g|_max, where B bounds them before.
        The core uses it to prove an update cannot overflow without reading the state (ServerCore._apply_finite):
        it must never be too small. This default covers every rule of the paper: OrMo's 1/(1-beta) on eta*g,
        SMEGA2's sent estimate's 2*eta*K on v, the accumulators' 1 on g."""
        return 2.0 + 2.0 * abs(lr) * self.num_workers, 1.0 + abs(lr) / (1.0 - self.beta)

    def effective_lr(self, lr: float, iteration_index: int, iteration: int) -> float:
        """The learning rate this rule applies to a gradient (OrMo-DA adapts it to the delay)."""
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state beside `w` (tensors and numbers), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registry entry: how to build the rule, and the scheduler the method is defined with."""

    name: str
    factory: Callable[..., UpdateRule]
    default_scheduler: str
    summary: str
    label: str  # the method's name in tables and figures, as the paper writes it
    paper_rank: int  # its place in the paper's tables (baselines first)
    options: tuple[str, ...] = ()  # keyword options the factory accepts (e.g. OrMo's `vanilla_sgd_step`)


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register(
    name: str,
    factory: Callable[..., UpdateRule],
    default_scheduler: str,
    summary: str,
    *,
    label: str,
    paper_rank: int,
    options: tuple[str, ...] = (),
) -> None:
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} registered twice")
    if default_scheduler not in SCHEDULERS:
        raise ValueError(f"default_scheduler must be one of {SCHEDULERS}, got {default_scheduler!r}")
    ALGORITHMS[name] = AlgorithmSpec(name, factory, default_scheduler, summary, label, paper_rank, options)


def get_algorithm(name: str) -> AlgorithmSpec:
    return lookup(ALGORITHMS, name, "algorithm")
