"""The learning-rate schedule in epochs: linear warm-up, then step decay at given epochs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """`eta` as a function of the server iteration that applies a gradient.

    An epoch is `iterations_per_epoch` server iterations (N_train / B). During the first
    `warmup_epochs` the rate rises linearly, reaching `base_lr` at the end of the warm-up; after
    that it is multiplied by `gamma` at each epoch in `milestones` (step decay).
    """

    base_lr: float
    iterations_per_epoch: int = 1
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        # The rate, warm-up, milestones and gamma are RunConfig's settings, checked there; the epoch's length
        # comes from the data set.
        if self.iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {self.iterations_per_epoch}")

    def epoch(self, iteration: int) -> float:
        return iteration / self.iterations_per_epoch

    def __call__(self, iteration: int) -> float:
        lr = self.base_lr
        warmup_iterations = self.warmup_epochs * self.iterations_per_epoch
        if iteration < warmup_iterations:
            lr *= (iteration + 1) / warmup_iterations
        decays = bisect.bisect_right(self.milestones, self.epoch(iteration))
        return lr * self.gamma**decays
