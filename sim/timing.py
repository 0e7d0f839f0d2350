"""The simulator's compute-time model: how many virtual seconds each virtual worker's gradient takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ormo_ps.common import settings
from ormo_ps.common.settings import setting


@dataclass(frozen=True)
class ComputeTimeModel:
    """Virtual seconds one gradient takes: `compute_time * U(1 - jitter, 1 + jitter)`, times `slowdown` for
    slow workers. Homogeneous: `slow_workers = 0`. Heterogeneous: the last `slow_workers` of the K workers are
    slow (ps-launch's `--slow-workers N --slowdown F` make the same run with processes)."""

    compute_time: float = setting(1.0, "Mean virtual seconds one gradient takes on a normal worker.",
                                  min=0, min_open=True)
    jitter: float = setting(0.1, "Relative spread of compute times: each is mean * U(1-jitter, 1+jitter).",
                            min=0, max=1, max_open=True)
    slow_workers: int = setting(0, "How many of the K workers are slow.", min=0)
    slowdown: float = setting(4.0, "How many times slower a slow worker is.", min=1)

    def __post_init__(self) -> None:
        settings.validate(self)

    def slow_worker_ids(self, num_workers: int) -> frozenset[int]:
        if self.slow_workers > num_workers:
            raise ValueError(f"slow_workers {self.slow_workers} is more than the {num_workers} workers")
        return frozenset(range(num_workers - self.slow_workers, num_workers))

    def duration(self, worker: int, num_workers: int, rng: np.random.Generator) -> float:
        factor = self.slowdown if worker in self.slow_worker_ids(num_workers) else 1.0
        return self.compute_time * factor * float(rng.uniform(1 - self.jitter, 1 + self.jitter))
