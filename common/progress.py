"""Progress of a run on the console: a tqdm bar on a terminal; elsewhere (a log file, a pipe, CI) a plain line
every `interval` seconds, each with the rate and the time left.

    meter = Progress(total_iterations)
    meter.update(iteration, epoch=3.2, loss=0.41)   # as often as you like: it draws only when due
    meter.write("eval epoch 3.00: test accuracy 0.9512")   # a message, above the bar on a terminal
    meter.close()
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

# How a field is written after the counts: "epoch 3.20", "loss 0.4100", "test acc 0.9512", "workers 4/4".
_FORMATS = {"epoch": "{:.2f}", "loss": "{:.4f}", "test_acc": "{:.4f}"}


def _field(name: str, value: Any) -> str:
    text = _FORMATS.get(name, "{}").format(value) if isinstance(value, (int, float)) else str(value)
    return f"{name.replace('_', ' ')} {text}"


def duration(seconds: float) -> str:
    """"0:42", "12:05", "1:02:05"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _columns(stream: TextIO) -> int | None:
    """The width of the terminal `stream` is, None when unknown. Some terminals (a pty nobody sized: `docker
    run -t` from a script, `script`, CI runners) report 0 columns, on which tqdm draws nothing at all."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class Progress:
    """Counts iterations up to `total`; `bar` None: a bar when `stream` is a terminal with a width, lines
    otherwise."""

    def __init__(self, total: int, *, stream: TextIO | None = None, interval: float = 10.0,
                 bar: bool | None = None, unit: str = "it", label: str = "iter") -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.unit = unit
        self.label = label
        self.fields: dict[str, Any] = {}
        self.position: int | None = None
        self._began: tuple[float, int] | None = None  # when the count started moving, and from where
        self._last_line = -math.inf
        self._said: tuple[int | None, str] | None = None  # what the last line said
        self._closed = False
        self._created = self._moved_at = time.monotonic()
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)()) and _columns(self.stream) != 0
        self._bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True, desc="train",
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                    "[{elapsed}<{remaining}, {rate_fmt}]{postfix}") if bar else None

    # ----- counting ----------------------------------------------------------------------------------
    def update(self, position: int, *, at: float | None = None, **fields: Any) -> None:
        """The count is now `position`, at time `at` of the caller's clock (the same clock in every call; default
        this process's); `fields` (epoch, loss, ...) are shown after it (None: not shown). A position behind
        the current one (an older report) changes nothing."""
        if self.position is not None and position < self.position:
            return
        when = time.monotonic() if at is None else at
        if self._began is None or position == self._began[1]:
            self._began = (when, position)  # the rate counts from the first move (not the wait for workers)
        if position != self.position:
            self._moved_at = when
        if self._bar is not None:
            if self.position is None:
                self._bar.reset(total=self.total)
            self._bar.update(position - (self.position or 0))
        self.position = position
        self.show(**fields)

    def show(self, **fields: Any) -> None:
        """Show `fields` after the count (None: leave as is), which stays where it is."""
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(self._fields(), refresh=False)
        elif self.position is not None and now - self._last_line >= self.interval:
            self._print_line(now)  # the last line comes from close()

    def rate(self) -> float | None:
        """Iterations per second from the count's first move to its last."""
        if self._began is None or self.position is None:
            return None
        elapsed = self._moved_at - self._began[0]
        moved = self.position - self._began[1]
        return moved / elapsed if moved > 0 and elapsed > 0 else None

    def line(self, now: float | None = None) -> str:
        """'iter 1200/2790 (43%) epoch 12.90 loss 0.0776 | 512.3 it/s, 0:09 elapsed, 0:03 left'."""
        now = now if now is not None else time.monotonic()
        pos = self.position or 0
        text = f"{self.label} {pos}/{self.total} ({100 * pos / max(self.total, 1):.0f}%)"
        if self.fields:
            text += " " + self._fields()
        rate = self.rate()
        if rate is not None:
            left = (self.total - pos) / rate
            text += (f" | {rate:.1f} {self.unit}/s, {duration(now - self._created)} elapsed, "
                     + ("done" if pos >= self.total else f"{duration(left)} left"))
        return text

    def _fields(self) -> str:
        return " ".join(_field(k, v) for k, v in self.fields.items())

    def _print_line(self, now: float) -> None:
        said = (self.position, self._fields())
        if self._said == said and now - self._last_line < 6 * self.interval:
            return  # nothing new to say (a stall is said again, now and then)
        print(self.line(now), file=self.stream, flush=True)
        self._last_line, self._said = now, said

    # ----- messages --------------------------------------------------------------------------------
    def write(self, message: str) -> None:
        """A line of its own: above the bar on a terminal."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def phase(self, name: str, announce: bool = False) -> None:
        """What the run does now ("train", "eval"): the bar's label; `announce` also writes it as a line where
        there is no bar (a long step, such as a final evaluation, then explains the silence)."""
        if self._bar is not None:
            self._bar.set_description_str(name)
        elif announce:
            self.write(f"{name} ...")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.position is not None:
            self._print_line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
