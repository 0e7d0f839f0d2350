"""The simulator: K virtual workers with a compute-time model drive the same ServerCore as the service.

Each virtual worker holds the last (parameter, index) the core sent it. A priority queue of finish times
decides which worker's gradient arrives next; that gradient is computed for real, at the parameter the
worker holds, on the worker's own mini-batch stream. With a seed the run is reproducible bit for bit.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.data import BatchStream, Dataset, iterations_per_epoch, load_dataset
from common.evaluation import Evaluator
from common.gradients import GradientComputer
from common.metrics import MetricsWriter, RunningMean
from common.models import recompute_bn_stats
from server.run import initial_model, make_core
from server.core import Dispatch

logger = logging.getLogger(__name__)

# A run whose mean training loss over a progress window exceeds this multiple of the first window's has
# diverged (a loss of 1e23 is not a result); non-finite losses or gradients count at once.
DIVERGENCE_FACTOR = 10.0


@dataclass(frozen=True)
class ComputeTimeModel:
    """Virtual seconds one gradient takes: `mean * U(1 - jitter, 1 + jitter)`, times `slow_factor` for slow workers.

    Homogeneous: `slow_fraction = 0`. Heterogeneous: the last `round(slow_fraction * K)` workers are slow.
    """

    mean: float = 1.0
    jitter: float = 0.1
    slow_fraction: float = 0.0
    slow_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.mean > 0:
            raise ValueError(f"compute_time must be > 0, got {self.mean}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0 <= self.slow_fraction <= 1:
            raise ValueError(f"slow_fraction must be in [0, 1], got {self.slow_fraction}")
        if not self.slow_factor >= 1:
            raise ValueError(f"slow_factor must be >= 1, got {self.slow_factor}")

    def slow_workers(self, num_workers: int) -> frozenset[int]:
        n_slow = round(self.slow_fraction * num_workers)
        return frozenset(range(num_workers - n_slow, num_workers))

    def duration(self, worker: int, num_workers: int, rng: np.random.Generator) -> float:
        factor = self.slow_factor if worker in self.slow_workers(num_workers) else 1.0
        return self.mean * factor * float(rng.uniform(1 - self.jitter, 1 + self.jitter))


@dataclass
class SimResult:
    params: torch.Tensor
    summary: dict[str, Any]


class Simulator:
    def __init__(
        self,
        run: RunConfig,
        timing: ComputeTimeModel = ComputeTimeModel(),
        *,
        out_dir: str | Path | None = None,
        device: str = "cpu",
        eval_every: float | None = 1.0,
        final_eval: bool = True,
        log_every: int | None = None,
        dataset: Dataset | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.run = run
        self.timing = timing
        self.device = torch.device(device)
        self.dataset = dataset if dataset is not None else load_dataset(run.dataset, run.data_dir, run.download)
        self.iters_per_epoch = iterations_per_epoch(self.dataset, run.batch_size)
        if self.iters_per_epoch < 1:
            raise ValueError(f"batch_size {run.batch_size} is larger than the train set ({self.dataset.num_train})")
        self.model = initial_model(run, self.dataset, self.device)
        self.core = make_core(run, self.model.params, self.iters_per_epoch)
        self.gradients = GradientComputer(self.model, run.weight_decay)
        # One copy of the training set on the device, shared by every worker's stream.
        train_data = self.dataset.to(self.device) if self.device.type != "cpu" else self.dataset
        self.streams = [BatchStream(train_data, run.batch_size, run.worker_seed(k), self.device)
                        for k in range(run.workers)]
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_every = eval_every or None  # None or 0: evaluate only at the end
        self.final_eval = final_eval
        self.log_every = log_every or max(1, self.iters_per_epoch // 10)
        self.progress = progress
        self._evaluator: Evaluator | None = None
        self._reset()

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            eval_model = initial_model(self.run, self.dataset, self.device)
            self._evaluator = Evaluator(eval_model, self.dataset, seed=self.run.seed)
        return self._evaluator

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    # ----- the event loop ------------------------------------------------------------------
    def _reset(self) -> None:
        """The run's mutable state beside the core and the data streams (all of it is checkpointed)."""
        self.rng = np.random.default_rng(self.run.seed)  # compute times
        self.held: dict[int, tuple[torch.Tensor, int]] = {}  # worker -> (parameter it holds, its index)
        self.queue: list[tuple[float, int, int]] = []  # (finish time, tie-breaking sequence number, worker)
        self.sequence = 0
        self.now = 0.0
        self.train_loss_window, self.train_loss_epoch = RunningMean(), RunningMean()
        self.window_delays: list[int] = []
        self.next_eval = self.eval_every
        self.evals: list[dict[str, Any]] = []
        self.diverged_at: int | None = None
        self.first_window_loss: float | None = None  # the yardstick of divergence
        self.wall_seconds = 0.0

    def _deliver(self, dispatches: list[Dispatch]) -> None:
        for d in dispatches:
            params = d.params.clone()  # shared read-only by every receiver of this dispatch
            for k in d.workers:
                self.held[k] = (params, d.iteration_index)
                finish = self.now + self.timing.duration(k, self.run.workers, self.rng)
                heapq.heappush(self.queue, (finish, self.sequence, k))
                self.sequence += 1

    def _open_metrics(self) -> MetricsWriter | None:
        if not self.out_dir:
            return None
        if self.core.started:  # resumed: keep what the first part wrote
            return MetricsWriter(self.out_dir / "metrics.jsonl", mode="a")
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl")
        metrics.write("start", source="sim", config=self.run.to_dict(), num_parameters=self.model.numel,
                      iterations_per_epoch=self.iters_per_epoch, total_iterations=self.core.config.total_iterations,
                      timing=vars(self.timing), slow_workers=sorted(self.timing.slow_workers(self.run.workers)))
        return metrics

    def simulate(self, stop_at: int | None = None) -> SimResult | None:
        """Run to the end (or pause once `stop_at` iterations are done, returning None: see `state_dict`)."""
        core = self.core
        total = core.config.total_iterations
        metrics = self._open_metrics()
        wall0 = time.monotonic()
        if not core.started:
            self._reset()
            self._deliver([core.start()])
        while not core.done and self.queue and (stop_at is None or core.iteration < stop_at):
            self.now, _, k = heapq.heappop(self.queue)
            params, ite = self.held.pop(k)
            x, y = next(self.streams[k])
            grad, loss = self.gradients.compute(params, x, y)
            if not math.isfinite(loss) or not bool(torch.isfinite(grad).all()):
                self.diverged_at = core.iteration
                self._say(f"diverged at iteration {core.iteration}: non-finite loss or gradient")
                break
            self.window_delays.append(core.iteration - ite)
            self._deliver(core.push(k, grad, ite))
            self.train_loss_window.add(loss)
            self.train_loss_epoch.add(loss)
            t = core.iteration
            if t % self.log_every == 0 or core.done:
                record = dict(iteration=t, epoch=round(core.epoch, 4), time=round(self.now, 4), lr=core.lr(),
                              train_loss=self.train_loss_window.pop(),
                              staleness_mean=float(np.mean(self.window_delays)),
                              staleness_max=int(max(self.window_delays)))
                self.window_delays.clear()
                if metrics:
                    metrics.write("progress", **record)
                self._say(f"iter {t}/{total} epoch {core.epoch:.2f} loss {record['train_loss']:.4f} "
                          f"lr {record['lr']:.4g} staleness {record['staleness_mean']:.1f}")
                if self.first_window_loss is None:
                    self.first_window_loss = record["train_loss"]
                elif record["train_loss"] > DIVERGENCE_FACTOR * self.first_window_loss:
                    self.diverged_at = t
                    self._say(f"diverged at iteration {t}: training loss {record['train_loss']:.4g} is more than "
                              f"{DIVERGENCE_FACTOR:g}x that of the first iterations ({self.first_window_loss:.4g})")
                    break
            if self.eval_every and (core.epoch >= self.next_eval or core.done):
                while self.next_eval <= core.epoch:
                    self.next_eval += self.eval_every
                self.evals.append(self._evaluate(metrics, self.now, self.train_loss_epoch.pop()))
        self.wall_seconds += time.monotonic() - wall0
        if not core.done and self.diverged_at is None and self.queue:
            if metrics:
                metrics.close()
            return None  # paused at stop_at
        if self.final_eval and self.diverged_at is None and (not self.evals
                                                             or self.evals[-1]["iteration"] != core.iteration):
            self.evals.append(self._evaluate(metrics, self.now, self.train_loss_epoch.pop()))
        summary = self._summary(self.now, self.wall_seconds, self.evals, self.diverged_at)
        if metrics:
            metrics.write("summary", **summary)
            metrics.close()
        if self.out_dir:
            self.save(self.out_dir / "final.pt")
        return SimResult(core.current_params().clone(), summary)

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a paused simulation needs to continue exactly as if it had never stopped."""
        held_ids: dict[int, int] = {}
        held_params: list[torch.Tensor] = []
        held: dict[int, tuple[int, int]] = {}
        for k, (params, ite) in self.held.items():
            slot = held_ids.setdefault(id(params), len(held_params))
            if slot == len(held_params):
                held_params.append(params.cpu().clone())
            held[k] = (slot, ite)
        return {
            "core": self.core.state_dict(), "run": self.run.to_dict() | {"model": self.run.model},
            "held_params": held_params, "held": held, "queue": list(self.queue), "sequence": self.sequence,
            "now": self.now, "rng": self.rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams],
            "loss": [vars(self.train_loss_window).copy(), vars(self.train_loss_epoch).copy()],
            "window_delays": list(self.window_delays), "next_eval": self.next_eval, "evals": list(self.evals),
            "diverged_at": self.diverged_at, "first_window_loss": self.first_window_loss,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.core.load_state_dict(state["core"])
        params = [p.to(self.device) for p in state["held_params"]]
        self.held = {int(k): (params[slot], ite) for k, (slot, ite) in state["held"].items()}
        self.queue = [tuple(e) for e in state["queue"]]
        heapq.heapify(self.queue)
        self.sequence, self.now = state["sequence"], state["now"]
        self.rng.bit_generator.state = state["rng"]
        for stream, st in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(st)
        for mean, st in zip((self.train_loss_window, self.train_loss_epoch), state["loss"]):
            mean.total, mean.count = st["total"], st["count"]
        self.window_delays = list(state["window_delays"])
        self.next_eval, self.evals = state["next_eval"], list(state["evals"])
        self.diverged_at, self.wall_seconds = state["diverged_at"], state["wall_seconds"]
        self.first_window_loss = state.get("first_window_loss")

    def _evaluate(self, metrics: MetricsWriter | None, now: float, train_loss: float | None) -> dict[str, Any]:
        core = self.core
        result = self.evaluator(core.current_params())
        record = dict(iteration=core.iteration, epoch=round(core.epoch, 4), time=round(now, 4),
                      train_loss=train_loss, **result)
        if metrics:
            metrics.write("eval", **record)
        loss_text = f"{train_loss:.4f}" if train_loss is not None else "-"
        val_text = f"val accuracy {result['val_accuracy']:.4f} " if "val_accuracy" in result else ""
        self._say(f"eval epoch {core.epoch:.2f}: {val_text}test accuracy {result['test_accuracy']:.4f} "
                  f"test loss {result['test_loss']:.4f} train loss {loss_text}")
        return record

    def _summary(self, now: float, wall: float, evals: list[dict[str, Any]], diverged_at: int | None) -> dict[str, Any]:
        core = self.core
        st = core.staleness
        last = evals[-1] if evals else {}
        return dict(
            algo=self.run.algo, workers=self.run.workers, iterations=core.iteration, epochs=round(core.epoch, 4),
            time=round(now, 4), wall_seconds=round(wall, 3),
            gradients_per_second=round(core.iteration / wall, 3) if wall > 0 else None,
            final_test_accuracy=last.get("test_accuracy"), final_test_loss=last.get("test_loss"),
            final_train_loss=last.get("train_loss"),
            best_test_accuracy=max((e["test_accuracy"] for e in evals), default=None),
            **({"final_val_accuracy": last.get("val_accuracy"), "final_val_loss": last.get("val_loss")}
               if self.dataset.val_x is not None else {}),
            diverged=diverged_at is not None, diverged_at_iteration=diverged_at,
            staleness_mean=round(st.mean, 4), staleness_max=st.maximum,
            staleness_histogram={str(k): v for k, v in sorted(st.histogram.items())},
            gradients_per_worker=[rec.gradients_applied for rec in core.workers],
        )

    def save(self, path: Path) -> None:
        """The final parameters: the flat vector and a model state dict with BatchNorm statistics recomputed."""
        evaluator = self.evaluator
        evaluator.model.load_(self.core.current_params())
        recompute_bn_stats(evaluator.model.module, evaluator.calibration)
        tmp = path.with_suffix(".tmp")
        torch.save({"params": self.core.current_params().cpu().clone(), "iteration": self.core.iteration,
                    "config": self.run.to_dict(), "model_state": evaluator.model.module.state_dict()}, tmp)
        tmp.replace(path)
