"""The simulator: K virtual workers with a compute-time model drive the same ServerCore as the service.

Each virtual worker holds the last (parameter, index) the core sent it. A priority queue of finish times
decides which worker's gradient arrives next; that gradient is computed for real, at the parameter the
worker holds, on the worker's own mini-batch stream. With a seed the run is reproducible bit for bit.

Batched (`batched=True`, the default on a GPU): every outstanding gradient is computed in one call and
kept until its arrival; the same run to float rounding (sim/batched.py says why).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ormo_ps.common.tensor_checks import all_finite
from ormo_ps.common.tensor_header import CodecError
from ormo_ps.common.wire_dtype import overflow_hint, round_trip
from ormo_ps.common.data import BatchStream, Dataset, iterations_per_epoch, load_dataset
from ormo_ps.common.evaluation import Evaluator
from ormo_ps.common.gradients import GradientComputer
from ormo_ps.common.metrics import MetricsWriter, RecordListener, RunRecorder
from ormo_ps.common.progress import Progress
from ormo_ps.server.checkpoint import save_final
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import Dispatch, ServerCore
from ormo_ps.server.shards import ShardedCore
from ormo_ps.sim.batched import BatchedGradients
from ormo_ps.sim.timing import ComputeTimeModel

logger = logging.getLogger(__name__)

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
        meter: Progress | None = None,
        batched: bool | None = None,
        batch_limit: int | None = None,
        listeners: Sequence[RecordListener] = (),
        shards: int = 1,
    ) -> None:
        """`progress(line)` receives a line per progress and eval record; `meter` shows them instead (a bar on
        a terminal, periodic lines with rate and time left elsewhere). `batched`: compute the outstanding
        gradients together (None: on a GPU, not on the CPU, where one at a time is faster for convolutional
        models: bench/results/batched_sim.md), at most `batch_limit` workers' per call (None: all).
        `listeners` watch the records as they are written to OUT/metrics.jsonl (a live TensorBoard).
        `shards` > 1: the server's arithmetic as that many slices (server/shards.py), equal bit for bit."""
        self.listeners = list(listeners)
        self.run = run
        self.timing = timing
        self.device = torch.device(device)
        self.dataset = dataset if dataset is not None else load_dataset(run.dataset, run.data_dir, run.download)
        timing.slow_worker_ids(run.workers)  # no more slow workers than workers
        self.iters_per_epoch = iterations_per_epoch(self.dataset, run.batch_size)
        if self.iters_per_epoch < 1:
            raise ValueError(f"batch_size {run.batch_size} is larger than the train set ({self.dataset.num_train})")
        self.model = run.initial_model(self.dataset, self.device)
        self.core = (ServerCore(self.model.params, run, self.iters_per_epoch) if shards == 1
                     else ShardedCore(self.model.params, run, self.iters_per_epoch, shards=shards))
        self.wire = run.wire_torch_dtype  # what gradients and parameters travel as in the service (wire_dtype.py)
        self.gradients = GradientComputer(self.model, run.weight_decay)
        self.batched = self.device.type != "cpu" if batched is None else batched
        if batch_limit is not None and batch_limit < 1:
            raise ValueError(f"batch_limit must be >= 1, got {batch_limit}")
        self.batch_limit = batch_limit
        self.batched_gradients = BatchedGradients(self.model.module, run.weight_decay) if self.batched else None
        # One copy of the training set on the device, shared by every worker's stream.
        train_data = self.dataset.to(self.device) if self.device.type != "cpu" else self.dataset
        self.streams = [BatchStream(train_data, run.batch_size, run.worker_seed(k), self.device)
                        for k in range(run.workers)]
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_every = eval_every or None  # None or 0: evaluate only at the end
        self.final_eval = final_eval
        self.log_every = log_every or max(1, self.iters_per_epoch // 10)
        self.progress = progress
        self.meter = meter
        self._evaluator: Evaluator | None = None
        self._reset()

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.run.initial_model(self.dataset, self.device), self.dataset,
                                        seed=self.run.seed)
        return self._evaluator

    # ----- the event loop ------------------------------------------------------------------
    def _reset(self) -> None:
        """The run's mutable state beside the core and the data streams (all of it is checkpointed)."""
        self.rng = np.random.default_rng(self.run.seed)  # compute times
        self.held: dict[int, tuple[torch.Tensor, int]] = {}  # worker -> (parameter it holds, its index)
        # worker -> (its outstanding gradient, loss, finite), computed ahead of its arrival by a batched call
        self.computed: dict[int, tuple[torch.Tensor, float, bool]] = {}
        self.batched_calls = 0
        self.gradients_computed = 0  # by batched calls, including those a run's end leaves unused
        self.queue: list[tuple[float, int, int]] = []  # (finish time, tie-breaking sequence number, worker)
        self.sequence = 0
        self.now = 0.0
        self.recorder = RunRecorder(None, log_every=self.log_every, total_iterations=self.core.total_iterations,
                                    clock=lambda: self.now, say=self.progress or (self.meter and self.meter.write),
                                    say_records=self.meter is None)
        self.next_eval = self.eval_every
        self.evals: list[dict[str, Any]] = []
        self.wall_seconds = 0.0

    @property
    def diverged_at(self) -> int | None:
        return self.recorder.diverged_at

    def _deliver(self, dispatches: list[Dispatch]) -> None:
        for d in dispatches:
            # What its receivers hold, as the service sends it: rounded to the run's wire dtype and widened back
            # (a copy, shared read-only by every receiver of this dispatch). CodecError on a float16 overflow.
            params = round_trip(d.params, self.wire, "the parameters")
            for k in d.workers:
                assert k not in self.held and k not in self.computed, f"worker {k} has a gradient outstanding"
                self.held[k] = (params, d.iteration_index)
                finish = self.now + self.timing.duration(k, self.run.workers, self.rng)
                heapq.heappush(self.queue, (finish, self.sequence, k))
                self.sequence += 1

    def _open_metrics(self) -> MetricsWriter | None:
        if not self.out_dir:
            return None
        if self.core.started:  # resumed: keep what the first part wrote
            return MetricsWriter(self.out_dir / "metrics.jsonl", mode="a", listeners=self.listeners)
        self.recorder.metrics = MetricsWriter(self.out_dir / "metrics.jsonl", listeners=self.listeners)
        self.recorder.start("sim", self.run.to_dict(), num_parameters=self.model.numel,
                            iterations_per_epoch=self.iters_per_epoch, timing=vars(self.timing),
                            gradients="batched" if self.batched else "one at a time",
                            slow_workers=sorted(self.timing.slow_worker_ids(self.run.workers)))
        return self.recorder.metrics

    def simulate(self, stop_at: int | None = None) -> SimResult | None:
        """Run to the end (or pause once `stop_at` iterations are done, returning None: see `state_dict`)."""
        core = self.core
        wall0 = time.monotonic()
        if not core.started:
            self._reset()
        recorder = self.recorder
        recorder.metrics = self._open_metrics()
        if not core.started:
            self._deliver([core.start()])
        while not core.done and self.queue and (stop_at is None or core.iteration < stop_at):
            self.now, _, k = heapq.heappop(self.queue)
            grad, loss, finite = self._gradient(k)
            _, ite = self.held.pop(k)
            if finite and self.wire != grad.dtype:  # it crosses the wire as the service's workers' do
                grad = round_trip(grad, self.wire, check=False)
                finite = all_finite(grad)
            if not finite:
                recorder.diverged(core.iteration, "non-finite loss or gradient" + overflow_hint(self.wire))
                break
            delay = core.iteration - ite
            before = core.iteration
            try:
                self._deliver(core.push(k, grad, ite))
            except CodecError as e:  # the parameters outgrew the float16 wire, as the service finds
                recorder.diverged(core.iteration, str(e))
                break
            if core.iteration == before:  # discarded by the rule (Ringmaster: too stale): no iteration to book
                continue
            record = recorder.gradient(core.iteration, core.epoch, core.lr(), loss, delay)
            if self.meter is not None:
                self.meter.update(core.iteration, epoch=core.epoch, loss=record and record["train_loss"])
            if recorder.diverged_at is not None:
                break
            if self.eval_every and (core.epoch >= self.next_eval or core.done):
                while self.next_eval <= core.epoch:
                    self.next_eval += self.eval_every
                self.evals.append(self._evaluate())
        self.wall_seconds += time.monotonic() - wall0
        if not core.done and self.diverged_at is None and self.queue:
            if recorder.metrics:
                recorder.metrics.close()
            return None  # paused at stop_at
        if self.final_eval and self.diverged_at is None and (not self.evals
                                                             or self.evals[-1]["iteration"] != core.iteration):
            self.evals.append(self._evaluate())
        summary = recorder.summary(core.summary(), **self._results())
        if recorder.metrics:
            recorder.metrics.close()
        if self.out_dir:
            self.save(self.out_dir)
        return SimResult(core.current_params().clone(), summary)

    def _gradient(self, k: int) -> tuple[torch.Tensor, float, bool]:
        """Worker k's gradient at the parameter it holds, on its next mini-batch: (gradient, its mini-batch
        loss, whether both are finite). The gradient may be a live buffer: apply it before the next call."""
        if k in self.computed:
            return self.computed.pop(k)
        if self.batched:
            self._compute_outstanding()
            return self.computed.pop(k)
        x, y = next(self.streams[k])
        grad, loss = self.gradients.compute(self.held[k][0], x, y)
        return grad, loss, math.isfinite(loss) and all_finite(grad)

    def _compute_outstanding(self) -> None:
        """Every outstanding gradient not computed yet (see `BatchedGradients.compute_for`)."""
        todo = sorted(k for k in self.held if k not in self.computed)
        calls = self.batched_gradients.compute_for(todo, self.held, self.streams, self.computed, self.batch_limit)
        self.batched_calls += calls
        self.gradients_computed += len(todo)

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
            "core": self.core.state_dict(), "run": self.run.to_dict(),
            "held_params": held_params, "held": held, "queue": list(self.queue), "sequence": self.sequence,
            "computed": {k: (g.cpu().clone(), loss, ok) for k, (g, loss, ok) in self.computed.items()},
            "batched_calls": self.batched_calls, "gradients_computed": self.gradients_computed,
            "now": self.now, "rng": self.rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams],
            "recorder": self.recorder.state_dict(), "next_eval": self.next_eval, "evals": list(self.evals),
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.core.load_state_dict(state["core"])
        params = [p.to(self.device) for p in state["held_params"]]
        self.held = {int(k): (params[slot], ite) for k, (slot, ite) in state["held"].items()}
        self.computed = {int(k): (g.to(self.device), loss, ok) for k, (g, loss, ok) in state.get("computed", {}).items()}
        self.batched_calls = state.get("batched_calls", 0)
        self.gradients_computed = state.get("gradients_computed", 0)
        self.queue = [tuple(e) for e in state["queue"]]
        heapq.heapify(self.queue)
        self.sequence, self.now = state["sequence"], state["now"]
        self.rng.bit_generator.state = state["rng"]
        for stream, st in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(st)
        self.recorder.load_state_dict(state["recorder"])
        self.next_eval, self.evals = state["next_eval"], list(state["evals"])
        self.wall_seconds = state["wall_seconds"]

    def _evaluate(self) -> dict[str, Any]:
        core = self.core
        if self.meter is not None:
            self.meter.phase("final evaluation" if core.done else "eval", announce=core.done)
        record = self.recorder.evaluation(core.iteration, core.epoch, self.evaluator(core.current_params()))
        if self.meter is not None:
            self.meter.update(core.iteration, test_acc=record["test_accuracy"])
            self.meter.phase("train")
        return record

    def _results(self) -> dict[str, Any]:
        """What the simulator adds to the summary: wall-clock speed and the evaluations' outcome."""
        evals, wall = self.evals, self.wall_seconds
        last = evals[-1] if evals else {}
        return dict(
            wall_seconds=round(wall, 3), gradients_per_second=round(self.core.iteration / wall, 3) if wall > 0 else None,
            final_test_accuracy=last.get("test_accuracy"), final_test_loss=last.get("test_loss"),
            **({"batched_calls": self.batched_calls, "gradients_computed": self.gradients_computed}
               if self.batched else {}),
            best_test_accuracy=max((e["test_accuracy"] for e in evals), default=None),
            **({"final_val_accuracy": last.get("val_accuracy"), "final_val_loss": last.get("val_loss")}
               if self.dataset.val_x is not None else {}),
        )

    def save(self, out_dir: Path) -> None:
        """final.pt: the flat parameters and a model state dict with BatchNorm statistics recomputed."""
        module = self.evaluator.load(self.core.current_params())
        save_final(out_dir, self.core.current_params(), self.core.iteration, self.run.to_dict(),
                   model_state=module.state_dict())
