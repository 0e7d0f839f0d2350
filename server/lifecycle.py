"""How a run ends: at its last iteration, or as diverged (every worker is told, the final state and the summary
written), or stopped before that (a shutdown: checkpoint, then tell the workers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.server.checkpoint import save_final

if TYPE_CHECKING:
    from ormo_ps.common.metrics import RunRecorder
    from ormo_ps.server.checkpointer import Checkpointer
    from ormo_ps.server.core import ServerCore
    from ormo_ps.server.stream import Connection

# The lifecycle is the service's own part: it logs as the service does.
logger = logging.getLogger("ormo_ps.server.service")


class RunLifecycle:
    """Whether the run is over (`ended`, `diverged`), and its end: `finish` once (from `diverge`, or
    `finish_if_ended` after a gradient), `finished` set when the final files are written; `final_fetched` set
    once an evaluator has fetched the final parameters (the server may then go)."""

    def __init__(self, core: ServerCore, recorder: RunRecorder, checkpoints: Checkpointer,
                 connections: dict[int, Connection], *, out_dir: Path | None,
                 model_state: Callable[[torch.Tensor], dict[str, Any]] | None,
                 summary_extras: Callable[[], dict[str, Any]],
                 params: Callable[[], Awaitable[tuple[torch.Tensor, int]]] | None = None) -> None:
        self.core = core
        self.params = params  # (a copy of w_t, t); default: the core's own
        self.recorder = recorder
        self.checkpoints = checkpoints
        self.connections = connections  # the streams to tell (Admission's, shared)
        self.out_dir = out_dir
        self.model_state = model_state  # the model's state dict at given parameters, for final.pt
        self.summary_extras = summary_extras  # the service's counters, for the summary record
        self.diverged: str | None = None  # why the run diverged, once it has
        self.finished = asyncio.Event()
        self.final_fetched = asyncio.Event()  # GetParameters has served the final parameters
        self._finish_task: asyncio.Task | None = None
        self.aborted: str | None = None  # why the run cannot go on (a sharded server lost a shard)
        self.abort_event = asyncio.Event()

    @property
    def ended(self) -> bool:
        """The run is over: it reached its last iteration, or it diverged."""
        return self.core.done or self.diverged is not None

    def stop_message(self) -> pb.ServerMessage:
        if self.diverged is not None:
            return pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_DIVERGED, detail=self.diverged))
        return pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_DONE,
                                             detail=f"run finished after {self.core.iteration} iterations"))

    def diverge(self, why: str) -> None:
        """End the run as diverged: the parameters stay the last finite ones; every worker is told."""
        self.diverged = f"the run diverged at iteration {self.core.iteration}: {why}"
        logger.error("%s", self.diverged)
        if self.recorder.diverged_at is None:
            self.recorder.diverged(self.core.iteration, why)
        self.finish_if_ended()

    def finish_if_ended(self) -> None:
        """Start the run's end once it has ended. The task is the service's, not a stream's: a worker hanging up
        must not cut it short."""
        if self.ended and self._finish_task is None:
            self._finish_task = asyncio.get_running_loop().create_task(self._finish())

    async def _finish(self) -> None:
        """The run ended (its last iteration, or divergence): stop every worker, write the final state and
        the summary."""
        stop = self.stop_message()
        for conn in self.connections.values():
            conn.send(stop)
        self.recorder.finish_epoch()
        await self.checkpoints.write_or_fail("the final checkpoint")
        if self.out_dir:
            try:
                params, iteration = (await self.params() if self.params is not None
                                     else (self.core.current_params().clone(), self.core.iteration))
                await asyncio.to_thread(self._save_final, params, iteration)
            except OSError as e:
                self.checkpoints.failed("final.pt", e.strerror or str(e))
            except RuntimeError as e:  # (a sharded server's shard lost at the end)
                self.checkpoints.failed("final.pt", str(e))
        self.recorder.summary(self.core.summary(), **self.summary_extras())
        if self.diverged is None:
            logger.info("run finished at iteration %d", self.core.iteration)
        self.finished.set()  # set last: whoever waits for it finds the final files written

    def _save_final(self, params: torch.Tensor, iteration: int) -> None:
        state = self.model_state(params) if self.model_state is not None else None
        save_final(self.out_dir, params, iteration, self.core.run.to_dict(), model_state=state)

    def abort(self, why: str) -> None:
        """The run cannot go on (a sharded server lost a shard): no checkpoint is written (the last one is a
        consistent cut; what came after is lost), every worker is told to wait for the server to come back."""
        if self.aborted is not None or self.finished.is_set():
            return
        self.aborted = why
        stop = pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_SHUTDOWN, detail=f"the server stops: {why}"))
        for conn in list(self.connections.values()):
            conn.send(stop)
        self.abort_event.set()

    async def shutdown(self, detail: str = "server shutting down") -> None:
        """Graceful stop before the end of the run: checkpoint, then tell the workers."""
        if not self.finished.is_set():
            await self.checkpoints.write_or_fail("the checkpoint on shutdown")
        stop = pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_SHUTDOWN, detail=detail))
        for conn in list(self.connections.values()):
            conn.send(stop)
