"""Log lines an outsider can cause, at a bounded rate: no client can fill the disk with the server's log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def shorten(text: object, limit: int = 80) -> str:
    """`text` as a printable one-line repr, cut to `limit` characters (a method name, a peer, a message)."""
    shown = repr(str(text))[1:-1]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class LimitedLog:
    """At most `burst` lines per `window` seconds through `log(message, *args)`; what is held back is
    counted and said in one line when the next window opens."""

    def __init__(self, logger: logging.Logger, what: str, burst: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.what = what
        self.burst = burst
        self.window = window
        self.clock = clock
        self._window_start = -float("inf")
        self._logged = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._window_start >= self.window:
            if self.suppressed:
                self.logger.warning("%d more %s in the last %.0fs were not logged", self.suppressed, self.what,
                                    self.window)
            self._window_start, self._logged, self.suppressed = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.warning(message, *args)
        else:
            self.suppressed += 1
