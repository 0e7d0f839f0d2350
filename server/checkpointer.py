"""When the service writes its checkpoint, and what it says when it cannot (the file format: server/checkpoint.py).

A `Checkpointer` writes OUT/checkpoint.pt from a snapshot of the service's state taken on the event loop
(so it is consistent), the write itself in a thread: every `every` seconds of training (`due()`, called
per applied gradient), on request (`write()`), one at a time: a checkpoint asked for while another is being
written waits for it, then snapshots the state as it is then. A write that fails (a full disk) is reported
once, not raised: the last good checkpoint stays, training goes on, and a later success says so
(`try_write()`). Files the run could not write at its end or on shutdown are collected in `failures`, which
ps-server turns into its exit error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ormo_ps.server.checkpoint import CHECKPOINT_NAME, save_checkpoint

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, out_dir: Path | None, every: float, snapshot: Callable[[], dict[str, Any]]) -> None:
        """`out_dir` None: nothing is ever written. `snapshot()` returns the state to save (on the loop)."""
        self.out_dir = out_dir
        self.every = every
        self.snapshot = snapshot
        self.iteration: int | None = None  # the iteration of the last checkpoint written (or resumed from)
        self.failures: list[str] = []  # files the run could not write at its end or on shutdown
        self.error: str | None = None  # why the last checkpoint could not be written
        self.written_at: float | None = None  # Unix time of the last checkpoint written (its metrics' age)
        self.written = 0  # checkpoints written by this process
        self.write_failures = 0  # writes that failed (each, not only the first of a series, as `error` says)
        self._last = time.monotonic()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def due(self) -> None:
        """Start a periodic checkpoint in the background when `every` seconds have passed since the last one
        and none is being written."""
        if (self.out_dir and time.monotonic() - self._last >= self.every
                and (self._task is None or self._task.done())):
            self._last = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self.try_write())

    async def write(self) -> Path | None:
        """Write checkpoint.pt now (after one being written, if any); OSError when it cannot be written."""
        if self.out_dir is None:
            return None
        async with self._lock:
            state = self.snapshot()  # on the loop; the write happens in a thread
            if inspect.isawaitable(state):  # (a sharded server's: its shards write theirs first)
                state = await state
            path = await asyncio.to_thread(save_checkpoint, self.out_dir / CHECKPOINT_NAME, state)
        self.iteration = state["core"]["iteration"]
        self.written_at = time.time()
        self.written += 1
        logger.info("checkpoint at iteration %d written to %s", self.iteration, path)
        return path

    async def try_write(self) -> bool:
        """`write()`, its failure reported once instead of raised; False when it could not be written."""
        try:
            await self.write()
        except OSError as e:
            self.write_failures += 1
            if self.error is None:
                kept = (f"the last good one (iteration {self.iteration}) is kept" if self.iteration is not None
                        else "there is none yet")
                logger.error("cannot write the checkpoint to %s (%s): %s; training goes on", self.out_dir,
                             e.strerror or e, kept)
            self.error = e.strerror or str(e)
            return False
        if self.error is not None:
            logger.warning("checkpoints are written again")
            self.error = None
        return True

    async def write_or_fail(self, what: str) -> None:
        """A checkpoint that must be written (at the end, on shutdown): its failure joins `failures`."""
        if not await self.try_write():
            self.failed(what, self.error or "unknown error")

    def failed(self, what: str, error: str) -> None:
        """`what` (a file of the run's end) could not be written; named with the checkpoint kept."""
        kept = (f"; the last good checkpoint (iteration {self.iteration}) is kept"
                if self.iteration is not None else "")
        self.failures.append(f"could not write {what} to {self.out_dir} ({error}){kept}")
        logger.error("%s", self.failures[-1])

    async def aclose(self) -> None:
        """Wait for a periodic checkpoint still being written."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
