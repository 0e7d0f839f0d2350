"""JSON-lines metrics: one record per event (start, progress, eval, summary), same schema everywhere."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

EVENTS = ("start", "progress", "eval", "summary")


class MetricsWriter:
    """Appends one JSON object per line to `path`, flushed at once so a crash loses nothing written."""

    def __init__(self, path: str | Path, mode: str = "w") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, mode, encoding="utf-8")
        self._t0 = time.monotonic()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown metrics event {event!r}; valid: {', '.join(EVENTS)}")
        record = _finite({"event": event, "wall_time": round(time.monotonic() - self._t0, 4), **fields})
        self._file.write(json.dumps(record, default=_jsonable, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
