"""ServerCore: the parameter, the update rule, the waiting set, the schedulers and the iteration indexes.

Pure: no sockets, clocks or files. A driver (the gRPC service, the simulator, a test) hands it
"gradient g computed at index ite by worker k" and gets back "send (params, index) to these workers".
It is not thread-safe by design: one driver task is its only writer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ormo_ps.common.tensor_checks import all_finite, check_finite, max_magnitude
from ormo_ps.common.tensor_header import CodecError
from ormo_ps.server.algorithms import get_algorithm
from ormo_ps.server.config import RunConfig

logger = logging.getLogger(__name__)


class PushRejected(ValueError):
    """A gradient the core refused; nothing was changed. `code` names the gRPC status a service returns;
    `reason` is the counter it is counted under (default: the code in lower case)."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.lower()


@dataclass(frozen=True)
class Dispatch:
    """Send `params` with `iteration_index` to `workers`.

    `params` is a live view of the server's state: serialise or copy it before the next `push`.
    """

    workers: tuple[int, ...]
    params: torch.Tensor
    iteration_index: int


@dataclass
class WorkerRecord:
    """Per-worker bookkeeping: the index it holds (None while it is in the waiting set) and its counts."""

    outstanding_index: int | None = None
    gradients_applied: int = 0
    delay_sum: int = 0
    delay_max: int = 0
    active: bool = True
    gradients_discarded: int = 0  # valid gradients the rule ignored (Ringmaster)


@dataclass
class StalenessStats:
    """Delays `tau = t - ite` of the applied gradients."""

    count: int = 0
    total: int = 0
    maximum: int = 0
    histogram: dict[int, int] = field(default_factory=dict)

    def add(self, delay: int) -> None:
        self.count += 1
        self.total += delay
        self.maximum = max(self.maximum, delay)
        self.histogram[delay] = self.histogram.get(delay, 0) + 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class ServerCore:
    """Algorithm 1 (SSGD/ASGD scheduling) around a registered update rule (Algorithm 2 for OrMo).

    `run` says what to compute (its rule, K, beta, eta's schedule, the run's length); an epoch is
    `iterations_per_epoch` server iterations (N_train / B), which the schedule and the length are counted in.
    """

    def __init__(self, params0: torch.Tensor, run: RunConfig, iterations_per_epoch: int = 1) -> None:
        self.run = run
        self.lr_schedule = run.lr_schedule(iterations_per_epoch)
        self.total_iterations = run.total_iterations(iterations_per_epoch)
        self._set_w(params0)
        self.scheduler = run.effective_scheduler
        self.iteration = 0  # t: gradients consumed so far
        self.waiting_set: set[int] = set()
        self.workers = [WorkerRecord() for _ in range(run.workers)]
        self.staleness = StalenessStats()
        self.started = False
        self.discarded = 0  # valid gradients the rule ignored (Ringmaster's too stale ones): no iteration

    def _set_w(self, params0: torch.Tensor) -> None:
        if params0.dim() != 1 or not params0.is_floating_point():
            raise ValueError(f"params0 must be a flat floating-point vector, got shape {tuple(params0.shape)} "
                             f"dtype {params0.dtype}")
        self.w = params0.detach().clone()
        spec = get_algorithm(self.run.algo)
        options: dict[str, Any] = {name: getattr(self.run, name) for name in spec.options}  # the rule's own settings
        self.rule = spec.factory(self.w, self.run.workers, self.run.momentum, **options)
        # Magnitudes below this leave an update room to grow without overflowing (see _apply_finite).
        self._safe_magnitude = torch.finfo(self.w.dtype).max / 1e3
        self._bound = self._measured_bound()

    def set_initial_params(self, params0: torch.Tensor) -> None:
        """`w_0` of a run whose model a client brings: the core was built with an empty vector and is given
        the first client's parameters before it starts."""
        if self.started or self.has_parameters:
            raise RuntimeError("the initial parameters are set once, before the run starts")
        self._set_w(params0)

    # ----- queries -------------------------------------------------------------------------
    @property
    def has_parameters(self) -> bool:
        """False only for a run whose model a client brings, until its `set_initial_params`."""
        return self.w.numel() > 0

    @property
    def num_workers(self) -> int:
        return self.run.workers

    @property
    def numel(self) -> int:
        """Length of the flat parameter vector (0 until a client brings the model)."""
        return self.w.numel()

    @property
    def done(self) -> bool:
        return self.iteration >= self.total_iterations

    @property
    def epoch(self) -> float:
        return self.lr_schedule.epoch(self.iteration)

    def lr(self) -> float:
        """The schedule's `eta` at the current iteration (before any per-gradient adaptation)."""
        return self.lr_schedule(self.iteration)

    def active_workers(self) -> list[int]:
        return [k for k, rec in enumerate(self.workers) if rec.active]

    # ----- driving -------------------------------------------------------------------------
    def start(self) -> Dispatch:
        """Send `(w_0, 0)` to every worker."""
        if self.started:
            raise RuntimeError("ServerCore.start() called twice")
        self.started = True
        for rec in self.workers:
            rec.outstanding_index = 0
        return Dispatch(tuple(range(self.num_workers)), self.rule.params_to_send(self.lr()), 0)

    def start_with(self, ready: set[int] | list[int]) -> Dispatch:
        """`start`, the workers not in `ready` deactivated (they join when they come): `(w_0, 0)` to `ready`."""
        dispatch = ServerCore.start(self)
        for w in range(self.num_workers):
            if w not in ready:
                ServerCore.deactivate(self, w)
        return Dispatch(tuple(sorted(ready)), dispatch.params, dispatch.iteration_index)

    def validate(self, worker: int, grad: torch.Tensor, iteration_index: int) -> float:
        """Raise `PushRejected` if the gradient cannot be applied; else return its largest magnitude.
        Changes nothing."""
        self.check_push(worker, iteration_index)
        return self.check_gradient(grad)

    def check_push(self, worker: int, iteration_index: int) -> None:
        """Raise `PushRejected` if no gradient of `worker` computed at `iteration_index` can be applied now (the
        run's and the worker's state; the gradient's values are `check_gradient`'s). Changes nothing."""
        if not self.started:
            raise PushRejected("FAILED_PRECONDITION", "the run has not started")
        if self.done:
            raise PushRejected("FAILED_PRECONDITION", f"the run is finished ({self.iteration} iterations)")
        if not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            raise PushRejected("NOT_FOUND", f"unknown worker id {worker!r}; valid ids are 0..{self.num_workers - 1}")
        rec = self.workers[worker]
        if not rec.active:
            raise PushRejected("FAILED_PRECONDITION", f"worker {worker} is not active; it must rejoin first")
        if iteration_index > self.iteration:
            raise PushRejected("INVALID_ARGUMENT", f"iteration index {iteration_index} is from the future "
                               f"(the server is at iteration {self.iteration})")
        if rec.outstanding_index is None:
            raise PushRejected("FAILED_PRECONDITION", f"worker {worker} holds no parameters: it is in the "
                               "waiting set until the synchronous round completes")
        if iteration_index != rec.outstanding_index:
            raise PushRejected("INVALID_ARGUMENT", f"worker {worker} was sent parameters with index "
                               f"{rec.outstanding_index}, but its gradient claims index {iteration_index}")

    def check_gradient(self, grad: torch.Tensor) -> float:
        """Raise `PushRejected` for a gradient of the wrong size or dtype, or not finite (unless the run allows
        it); else return its largest magnitude (one read). Changes nothing."""
        if grad.dim() != 1 or grad.numel() != self.w.numel():
            raise PushRejected("INVALID_ARGUMENT", f"gradient has shape {tuple(grad.shape)}; expected a flat "
                               f"vector of {self.w.numel()} elements")
        if grad.dtype != self.w.dtype:
            raise PushRejected("INVALID_ARGUMENT", f"gradient dtype {grad.dtype}; expected {self.w.dtype}")
        # One read of the gradient: its largest magnitude, NaN or infinite when any element is.
        g_max = max_magnitude(grad)
        if not math.isfinite(g_max) and not self.run.allow_nonfinite:
            try:
                check_finite(grad, "gradient")
            except CodecError as e:
                raise PushRejected("INVALID_ARGUMENT", str(e), reason="nonfinite") from None
        return g_max

    def push(self, worker: int, grad: torch.Tensor, iteration_index: int) -> list[Dispatch]:
        """One server iteration: apply `grad` from `worker` and return what to send to whom.

        Raises `PushRejected` (and changes nothing) for a gradient that cannot be applied, or whose update
        would make the server's state non-finite (a finite but huge gradient, or a huge eta).
        """
        g_max = self.validate(worker, grad, iteration_index)
        if grad.device != self.w.device:
            grad = grad.to(self.w.device)
        t = self.iteration
        if self.discarding(iteration_index):
            return self.discard(worker)
        lr = self.rule.effective_lr(self.lr_schedule(t), iteration_index, t)
        self._apply_finite(grad, iteration_index, t, worker, lr, g_max)
        return self.applied(worker, iteration_index, lr)

    def discarding(self, iteration_index: int) -> bool:
        """Whether a valid gradient computed at `iteration_index` is ignored now (Ringmaster: too stale)."""
        return self.scheduler == "async" and self.rule.discards(iteration_index, self.iteration)

    def discard(self, worker: int) -> list[Dispatch]:
        """Ignore the worker's valid gradient (`discarding`): it gets the current parameters back."""
        t = self.iteration
        rec = self.workers[worker]
        rec.gradients_discarded += 1
        rec.outstanding_index = t
        self.discarded += 1
        return [Dispatch((worker,), self.rule.params_to_send(self.lr_schedule(t)), t)]

    def apply_update(self, grad: torch.Tensor, iteration_index: int, worker: int, lr: float) -> None:
        """The rule's update of iteration t with this gradient, nothing else (no check, no bookkeeping: a
        sharded server's shard, server/shard.py, checks and counts around it as `push` does)."""
        self._apply(grad, iteration_index, self.iteration, worker, lr)

    def applied(self, worker: int, iteration_index: int, lr: float) -> list[Dispatch]:
        """The books of an update applied at iteration t (the delay, the worker's index, t+1) and the scheduler's
        answer."""
        t = self.iteration
        rec = self.workers[worker]
        delay = t - iteration_index
        rec.outstanding_index = None
        rec.gradients_applied += 1
        rec.delay_sum += delay
        rec.delay_max = max(rec.delay_max, delay)
        self.staleness.add(delay)
        self.iteration = t + 1
        self.waiting_set.add(worker)
        return self._schedule(lr)

    # ----- never a non-finite state ------------------------------------------------------------
    # Every state value after an update is a combination of the values before it and of eta*g, with
    # coefficients no rule exceeds (OrMo's 1/(1-beta) on eta*g, SMEGA2's sent estimate's 2*eta*K on v, the
    # accumulator's 1 on g). So `_bound`, an upper bound of the state's magnitudes kept without reading the
    # state, proves an update cannot overflow; only when it cannot prove that does the core read the state's
    # true magnitudes and, if even they do not prove it, apply the update to the state with a copy kept,
    # and put the copy back when the result is not finite.
    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.w, *(v for v in self.rule.state_dict().values() if isinstance(v, torch.Tensor))]

    def _measured_bound(self) -> float:
        return max(max_magnitude(t) for t in self._state_tensors())

    def measured_bound(self) -> float:
        """The state's largest magnitude, read (one pass over w and the rule's tensors)."""
        return self._measured_bound()

    def save_state(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """A copy of w and the rule's state, for `restore_state` (an update tried on the state itself)."""
        return self.w.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in self.rule.state_dict().items()}

    def restore_state(self, saved: tuple[torch.Tensor, dict[str, Any]]) -> None:
        self.w.copy_(saved[0])
        self.rule.load_state_dict(saved[1])

    def state_finite(self, lr: float) -> bool:
        """w, the rule's state and the parameters it would send at rate `lr` are all finite."""
        return all(all_finite(x) for x in (*self._state_tensors(), self.rule.params_to_send(lr)))

    def _predicted_bound(self, lr: float, g_max: float) -> float:
        a, b = self.rule.growth(lr)
        return self._bound * a + g_max * b

    def proves_finite(self, lr: float, g_max: float) -> bool:
        """Whether the state's bound proves that an update with rate `lr` and a gradient of largest magnitude
        `g_max` cannot overflow (reading the state's true magnitudes when the kept bound does not prove it).
        Only the kept bound changes (to the measured one, never looser): the update's result does not."""
        if self.run.allow_nonfinite:
            return True
        if self._predicted_bound(lr, g_max) > self._safe_magnitude:
            self._bound = self._measured_bound()
        return self._predicted_bound(lr, g_max) <= self._safe_magnitude

    def update_rate(self, iteration_index: int) -> float:
        """The rate the next update applies to a gradient computed at `iteration_index` (OrMo-DA adapts it)."""
        return self.rule.effective_lr(self.lr_schedule(self.iteration), iteration_index, self.iteration)

    def _apply(self, grad: torch.Tensor, iteration_index: int, t: int, worker: int, lr: float) -> None:
        self.rule.open_group(t, waiting_set_empty=not self.waiting_set)
        self.rule.apply(grad, iteration_index, t, worker, lr)

    def _apply_finite(self, grad: torch.Tensor, iteration_index: int, t: int, worker: int, lr: float,
                      g_max: float) -> None:
        if self.run.allow_nonfinite:  # the run asked for NaN and infinities to be applied
            self._apply(grad, iteration_index, t, worker, lr)
            return
        if self.proves_finite(lr, g_max):  # proved: the update cannot overflow
            self._apply(grad, iteration_index, t, worker, lr)
            self._bound = self._predicted_bound(lr, g_max)
            return
        saved = self.save_state()
        self._apply(grad, iteration_index, t, worker, lr)
        if self.state_finite(lr):
            self._bound = self._measured_bound()
            return
        self.restore_state(saved)
        raise PushRejected(
            "INVALID_ARGUMENT", f"applying this gradient would make the server's parameters non-finite "
            f"(|eta*g| up to {abs(lr) * g_max:.3g}, state up to {self._bound:.3g}): refused, nothing changed; "
            "the run is diverging (eta too large?)", reason="overflow")

    def _schedule(self, lr: float) -> list[Dispatch]:
        """The scheduler of Algorithm 1: option II answers at once, option I once every worker waits."""
        if self.done:
            return []
        if self.scheduler == "sync" and not self.waiting_set.issuperset(self.active_workers()):
            return []
        receivers = tuple(sorted(self.waiting_set))
        self.waiting_set.clear()
        for k in receivers:
            self.workers[k].outstanding_index = self.iteration
        return [Dispatch(receivers, self.rule.params_to_send(lr), self.iteration)]

    def deactivate(self, worker: int) -> list[Dispatch]:
        """A worker is gone: its in-flight gradient is lost; a synchronous round no longer waits for it."""
        rec = self.workers[worker]
        if not rec.active:
            return []
        rec.active = False
        rec.outstanding_index = None
        self.waiting_set.discard(worker)
        if self.scheduler == "sync" and self.waiting_set and self.started:
            return self._schedule(self.lr())
        return []

    def deactivate_all(self) -> None:
        """Every worker is gone at once (a resumed run): what was in flight is lost, nobody is waited for;
        each worker rejoins when it reconnects."""
        for rec in self.workers:
            rec.active = False
            rec.outstanding_index = None
        self.waiting_set.clear()

    def rejoin(self, worker: int) -> Dispatch | None:
        """A worker comes back: it gets the current parameters with their current index.

        In a synchronous run mid-round it waits in the waiting set for the round to complete instead.
        """
        rec = self.workers[worker]
        rec.active = True
        if self.done:
            return None
        if self.scheduler == "sync" and self.waiting_set:
            self.waiting_set.add(worker)
            rec.outstanding_index = None
            return None
        rec.outstanding_index = self.iteration
        return Dispatch((worker,), self.rule.params_to_send(self.lr()), self.iteration)

    def current_params(self) -> torch.Tensor:
        """The server's parameter `w_t` (what is evaluated; SMEGA2's estimate is only sent to workers)."""
        return self.w

    def summary(self) -> dict[str, Any]:
        """The run so far as the core counts it: length, staleness and gradients per worker."""
        st = self.staleness
        return dict(algo=self.run.algo, workers=self.num_workers, iterations=self.iteration,
                    epochs=round(self.epoch, 4), staleness_mean=round(st.mean, 4), staleness_max=st.maximum,
                    staleness_histogram={str(k): v for k, v in sorted(st.histogram.items())},
                    gradients_per_worker=[rec.gradients_applied for rec in self.workers],
                    gradients_discarded=self.discarded)

    # ----- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "algo": self.run.algo,
            "num_workers": self.num_workers,
            "w": self.w.clone(),
            "rule": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.rule.state_dict().items()},
            "iteration": self.iteration,
            "waiting_set": sorted(self.waiting_set),
            "started": self.started,
            "workers": [vars(rec).copy() for rec in self.workers],
            "staleness": vars(self.staleness).copy() | {"histogram": dict(self.staleness.histogram)},
            "discarded": self.discarded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["algo"] != self.run.algo or state["num_workers"] != self.num_workers:
            raise ValueError(f"checkpoint is for algo={state['algo']!r} K={state['num_workers']}; this server runs "
                             f"algo={self.run.algo!r} K={self.num_workers}")
        if state["w"].shape != self.w.shape:
            raise ValueError(f"checkpoint parameter has {state['w'].numel()} elements; the model has {self.w.numel()}")
        self.w.copy_(state["w"])
        self.rule.load_state_dict(state["rule"])
        self.iteration = int(state["iteration"])
        self.waiting_set = set(state["waiting_set"])
        self.started = bool(state["started"])
        self.workers = [WorkerRecord(**rec) for rec in state["workers"]]
        self.staleness = StalenessStats(**state["staleness"])
        self.discarded = int(state.get("discarded", 0))  # checkpoints of earlier versions have none
        self._bound = self._measured_bound()

