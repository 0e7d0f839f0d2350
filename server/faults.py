"""Whose fault is a non-finite gradient: one worker's (it is dropped) or the run's (it ends as diverged).

A gradient the core refuses as non-finite, or as one that would make the parameters non-finite (its reasons
`nonfinite` and `overflow`), is first its worker's fault: a bug, bad data or a broken accelerator on that
worker, or a client that means harm. So such gradients are counted per worker id (across reconnects: a
worker that reconnects with its id keeps its count), and a worker with `worker_limit` of them in a row (none
of its gradients applied in between) is dropped: its stream ends with ABORTED and a message that says why,
while the run goes on with the others. Its count stays until one of its gradients is applied, so a dropped
id is dropped again at its next non-finite gradient.

The run itself is diverging when the parameters cannot stay finite for anyone: then every worker's
gradients go non-finite. The rule: the run ends as diverged once more than half of the K workers have a
non-finite gradient as their latest (each counted since its own last applied gradient), and at least
`run_limit` such gradients are outstanding in all. With K=1 that is `run_limit` (3) in a row, as before;
with K=16, 9 distinct workers. One worker, however fast it sends, never ends the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FaultBook", "RUN_LIMIT", "Verdict", "WORKER_LIMIT"]

WORKER_LIMIT = 3  # non-finite gradients in a row from one worker id drop it
RUN_LIMIT = 3  # at least this many outstanding in all, from more than half of the workers, end the run


@dataclass(frozen=True)
class Verdict:
    """What a refused non-finite gradient means: drop its worker, end the run, or neither (just refused)."""

    drop_worker: bool
    run_diverged: bool


@dataclass
class FaultBook:
    """Non-finite gradients per worker id since that worker's last applied gradient."""

    num_workers: int
    worker_limit: int = WORKER_LIMIT
    run_limit: int = RUN_LIMIT
    streaks: dict[int, int] = field(default_factory=dict)

    def applied(self, worker: int) -> None:
        """One of `worker`'s gradients was applied: its count starts again."""
        self.streaks.pop(worker, None)

    def nonfinite(self, worker: int) -> Verdict:
        """Count one refused non-finite gradient of `worker`; what it means."""
        self.streaks[worker] = self.streaks.get(worker, 0) + 1
        return Verdict(drop_worker=self.streaks[worker] >= self.worker_limit, run_diverged=self.run_diverging())

    def run_diverging(self) -> bool:
        return (len(self.streaks) > self.num_workers // 2
                and sum(self.streaks.values()) >= self.run_limit)

    def describe(self) -> str:
        """The outstanding counts, for the run's divergence message."""
        return (f"{len(self.streaks)} of {self.num_workers} workers' latest gradients were non-finite or would "
                f"have made the parameters non-finite ({sum(self.streaks.values())} such gradients)")

    def state_dict(self) -> dict[str, dict[int, int]]:
        return {"streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict[str, dict[int, int]]) -> None:
        self.streaks = {int(k): int(v) for k, v in state["streaks"].items()}
