"""JSON-lines metrics: one record per event (start, progress, eval, summary), same schema everywhere."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

logger = logging.getLogger(__name__)

EVENTS = ("start", "progress", "eval", "summary")
# Beside metrics.jsonl, ps-launch's record of how it started the run's processes (which workers were slow:
# the server cannot know), read by ps-plot.
LAUNCH_FILE = "launch.json"


class RecordListener(Protocol):
    """Something that watches a run's records as they are written (common/live_tensorboard.py)."""

    def record(self, record: dict[str, Any]) -> None:
        """One record, as written to the file (never raises: a listener's trouble is its own)."""

    def close(self) -> None:
        """The writer is closed."""


class MetricsWriter:
    """Appends one JSON object per line to `path`, each line one write, so a crash loses nothing written.

    Every record carries `timestamp` (Unix time) and `wall_time`: seconds since the file's first record, whoever
    wrote it; a writer appending to a file (the evaluator beside the server, a resumed server) goes on with
    the file's clock, so both fields only grow down the file, whichever processes share it. A line that
    cannot be written (a full disk) is dropped, said once, and never stops the run: training matters more.
    Each record is also handed to the `listeners` (a live TensorBoard), the same values as the file's."""

    def __init__(self, path: str | Path, mode: str = "w", listeners: Sequence[RecordListener] = ()) -> None:
        self.path = Path(path)
        self.listeners = list(listeners)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = _file_origin(self.path) if mode == "a" else None
        self._file: IO[bytes] = open(self.path, mode + "b", buffering=0)  # one write per line: none is torn
        if self._t0 is None:
            self._t0 = round(time.time(), 3)
        self.dropped = 0  # records lost to write errors

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown metrics event {event!r}; valid: {', '.join(EVENTS)}")
        now = round(time.time(), 3)  # wall_time from the timestamp as written: both order the records alike
        record = _finite({"event": event, "wall_time": round(now - self._t0, 3), "timestamp": now, **fields})
        line = (json.dumps(record, default=_jsonable, allow_nan=False) + "\n").encode()
        self._write_line(line)
        for listener in self.listeners:  # after the file: a record a listener shows is in the file (or dropped)
            listener.record(record)
        return record

    def _write_line(self, line: bytes) -> None:
        try:
            self._file.write(line)
        except OSError as e:
            if not self.dropped:
                logger.error("cannot write metrics to %s (%s): records are dropped until writing works again",
                             self.path, e.strerror)
            self.dropped += 1
            return
        if self.dropped:
            logger.warning("metrics are written to %s again; %d records were dropped", self.path, self.dropped)
            self.dropped = 0

    def close(self) -> None:
        self._file.close()
        for listener in self.listeners:
            listener.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_origin(path: Path) -> float | None:
    """The Unix time at which the metrics file `path` started (its first record's timestamp less its
    wall_time); None when it has no readable first record."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
        return float(first["timestamp"]) - float(first["wall_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged run) become null: strict JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to metrics")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunningMean:
    """Mean of the values added since the last `pop()`."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float, weight: int = 1) -> None:
        self.total += value * weight
        self.count += weight

    def pop(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


# A run whose mean training loss over a progress window exceeds this multiple of the first window's has
# diverged (a loss of 1e23 is not a result); non-finite losses or gradients count at once.
DIVERGENCE_FACTOR = 10.0


def write_eval(metrics: MetricsWriter | None, iteration: int, epoch: float, time: float, train_loss: float | None,
               result: dict[str, float]) -> dict[str, Any]:
    """An `eval` record (the recorder's, or ps-eval's from another process): the evaluation `result` (test and
    validation accuracy and loss) of the parameters at `iteration`, with the training loss of that time."""
    fields = dict(iteration=iteration, epoch=round(epoch, 4), time=round(time, 4), train_loss=train_loss, **result)
    return metrics.write("eval", **fields) if metrics else dict(event="eval", **fields)


def describe_eval(record: dict[str, Any]) -> str:
    """One line for a person: "eval epoch 3.00: test accuracy 0.9512 test loss 0.1640 train loss 0.1234"."""
    val = f"val accuracy {record['val_accuracy']:.4f} " if record.get("val_accuracy") is not None else ""
    loss = record.get("train_loss")
    return (f"eval epoch {record['epoch']:.2f}: {val}test accuracy {record['test_accuracy']:.4f} test loss "
            f"{record['test_loss']:.4f} train loss {'-' if loss is None else f'{loss:.4f}'}")


class RunRecorder:
    """The books of one run, kept the same way by every driver (the gRPC service, the simulator): windows of
    training loss and staleness, the last epoch's training loss, divergence, and the `start`, `progress`,
    `eval` and `summary` records. A driver feeds it (iteration, loss, delay) per applied gradient.

    `clock()` is the run's time (wall-clock seconds for the service, virtual seconds for the simulator);
    `say(line)` receives a line per progress and eval record and when the run diverges (a logger, a progress
    callback, or nothing); with `say_records=False` only the divergence (a progress meter shows the rest).
    """

    def __init__(self, metrics: MetricsWriter | None, *, log_every: int, total_iterations: int,
                 clock: Callable[[], float], say: Callable[[str], None] | None = None, epoch: float = 0.0,
                 say_records: bool = True) -> None:
        self.metrics = metrics
        self.log_every = log_every
        self.total_iterations = total_iterations
        self.clock = clock
        self.say = say or (lambda line: None)
        self.say_record = self.say if say_records else (lambda line: None)
        self.loss_window = RunningMean()  # since the last progress record
        self.loss_epoch = RunningMean()  # since the last epoch boundary
        self.loss_since_eval = RunningMean()  # since the last eval record this recorder wrote
        self.last_eval: dict[str, Any] | None = None
        self.delays: list[int] = []
        self.last_epoch_train_loss: float | None = None
        self.first_window_loss: float | None = None  # the yardstick of divergence
        self.diverged_at: int | None = None
        self._epoch_of_loss = int(epoch)

    def _write(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.metrics.write(event, **fields) if self.metrics else dict(event=event, **fields)

    def start(self, source: str, config: dict[str, Any], **fields: Any) -> None:
        self._write("start", source=source, config=config, total_iterations=self.total_iterations, **fields)

    def gradient(self, iteration: int, epoch: float, lr: float, loss: float, delay: int,
                 **extra: Any) -> dict[str, Any] | None:
        """Book one applied gradient (the run is now at `iteration`): its worker's mini-batch loss (a non-finite
        one is not averaged in) and its delay. Returns the progress record when this iteration writes one;
        after it `diverged_at` says whether the training loss has run away (see DIVERGENCE_FACTOR)."""
        if math.isfinite(loss):
            for mean in (self.loss_window, self.loss_epoch, self.loss_since_eval):
                mean.add(loss)
        self.delays.append(delay)
        if int(epoch) > self._epoch_of_loss:
            self._epoch_of_loss = int(epoch)
            self.last_epoch_train_loss = self.loss_epoch.pop()
        if iteration % self.log_every and iteration < self.total_iterations:
            return None
        record = dict(iteration=iteration, epoch=round(epoch, 4), time=round(self.clock(), 4), lr=lr,
                      train_loss=self.loss_window.pop(), staleness_mean=sum(self.delays) / len(self.delays),
                      staleness_max=max(self.delays), **extra)
        self.delays.clear()
        record = self._write("progress", **record)
        loss_text = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        self.say_record(f"iter {iteration}/{self.total_iterations} epoch {epoch:.2f} loss {loss_text} lr {lr:.4g} "
                 f"staleness {record['staleness_mean']:.1f}" + "".join(f" {k.replace('_', ' ')} {v}"
                                                                   for k, v in extra.items()))
        loss = record["train_loss"]
        if loss is not None and self.diverged_at is None:
            if self.first_window_loss is None:
                self.first_window_loss = loss
            elif loss > DIVERGENCE_FACTOR * self.first_window_loss:
                self.diverged_at = iteration
                self.say(f"diverged at iteration {iteration}: training loss {loss:.4g} is more than "
                         f"{DIVERGENCE_FACTOR:g}x that of the first iterations ({self.first_window_loss:.4g})")
        return record

    def diverged(self, iteration: int, why: str) -> None:
        """The driver saw the run diverge (a non-finite loss or gradient it did not apply)."""
        self.diverged_at = iteration
        self.say(f"diverged at iteration {iteration}: {why}")

    def finish_epoch(self) -> float | None:
        """At the run's end: the last (partial) epoch's mean training loss becomes the last epoch's."""
        if self.loss_epoch.count:
            self.last_epoch_train_loss = self.loss_epoch.pop()
        return self.last_epoch_train_loss

    def evaluation(self, iteration: int, epoch: float, result: dict[str, float]) -> dict[str, Any]:
        """An `eval` record: `result` of an evaluation (test and validation accuracy and loss) at `iteration`,
        with the mean training loss since the previous evaluation."""
        self.last_eval = write_eval(self.metrics, iteration, epoch, self.clock(), self.loss_since_eval.pop(), result)
        self.say_record(describe_eval(self.last_eval))
        return self.last_eval

    def summary(self, run_summary: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The `summary` record: the core's own summary, the driver's fields, the run's time, its final training
        loss (of the last evaluation when this recorder made any, else of the last epoch; none when the run
        diverged: that loss is no result) and divergence."""
        final_train_loss = self.last_eval["train_loss"] if self.last_eval else self.last_epoch_train_loss
        if self.diverged_at is not None:
            final_train_loss = None
        return self._write("summary", **run_summary, time=round(self.clock(), 4), final_train_loss=final_train_loss,
                           diverged=self.diverged_at is not None, diverged_at_iteration=self.diverged_at, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": [vars(m).copy() for m in (self.loss_window, self.loss_epoch, self.loss_since_eval)],
                "delays": list(self.delays), "last_epoch_train_loss": self.last_epoch_train_loss,
                "first_window_loss": self.first_window_loss, "diverged_at": self.diverged_at,
                "epoch_of_loss": self._epoch_of_loss, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mean, st in zip((self.loss_window, self.loss_epoch, self.loss_since_eval), state["loss"], strict=True):
            mean.total, mean.count = st["total"], st["count"]
        self.last_eval = state["last_eval"]
        self.delays = list(state["delays"])
        self.last_epoch_train_loss = state["last_epoch_train_loss"]
        self.first_window_loss = state["first_window_loss"]
        self.diverged_at = state["diverged_at"]
        self._epoch_of_loss = state["epoch_of_loss"]
