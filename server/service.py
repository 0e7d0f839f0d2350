"""The gRPC `ParameterServer` service: one asyncio event loop drives ServerCore, the only writer.

Each worker has one bidirectional `Train` stream. A reader task per stream decodes messages and calls
`ServerCore.push` directly: code between two `await`s is atomic on one loop, so the core needs no lock,
gradients are applied in arrival order, and the parameters a push returns are encoded before anything
else can run. Answers go into a per-worker outbox: the reader writes the answers to its own worker's
message itself, right after it (no hand-over to another task: measured ~7 % of a ResNet20 round trip);
what others queue for the worker (a synchronous round's end, the run's end) wakes the stream's handler,
which writes it. One writer at a time per stream, in queue order. Who may join and
with what (Register, layout, initial parameters, Ready) is server/admission.py; when checkpoints are
written, server/checkpointer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from common import layout as layouts
from common.chunks import DEFAULT_CHUNK_BYTES, BufferPool
from common.codec import CodecError, decode, dtype_to_pb, encode
from common.layout import Layout
from common.log_limit import LimitedLog, shorten
from common.metrics import DIVERGENCE_FACTOR, MetricsWriter, RunRecorder
from common.pb import parameter_server_pb2 as pb
from common.pb import parameter_server_pb2_grpc as pb_grpc
from common.transport import TransportError
from common.wire import Received, parse_worker_message, serialize_message
from server.admission import END_STREAM, Admission, Connection, Rejected
from server.checkpoint import save_final
from server.checkpointer import Checkpointer
from server.core import Dispatch, PushRejected, ServerCore
from server.faults import FaultBook

logger = logging.getLogger(__name__)
SERVICE_NAME = "ps.v1.ParameterServer"

# Rejections counted as a worker's non-finite gradients (server/faults.py: they drop the worker, or, from
# more than half of the workers, end the run as diverged).
DIVERGING = ("nonfinite", "overflow")


@dataclass
class Counters:
    gradients_applied: int = 0
    gradients_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dropped_workers: int = 0
    gradients_discarded: int = 0  # valid, ignored by the rule (Ringmaster: too stale): no error, no iteration

    def reject(self, reason: str) -> None:
        self.gradients_rejected += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1


class ParameterServerService(Admission, pb_grpc.ParameterServerServicer):
    """The service of one run: its core, its workers' streams, its books (`recorder`) and its files."""

    def __init__(
        self,
        core: ServerCore,
        *,
        num_classes: int,
        out_dir: Path | None = None,
        metrics: MetricsWriter | None = None,
        log_every: int = 50,
        checkpoint_every: float = 60.0,
        wait_for_all_workers: bool = True,
        sync_timeout: float | None = None,
        ready_timeout: float = 120.0,
        model_state: Callable[[torch.Tensor], dict[str, Any]] | None = None,
        layout: Layout | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        first_message_timeout: float = 30.0,
        max_pending: int = 16,
    ) -> None:
        self.core = core
        self.model_state = model_state  # the model's state dict at given parameters, for final.pt
        # The run's parameter layout: its model's, or (a run that names none) the first client's.
        self.layout = layout
        self.run = core.run
        self.num_classes = num_classes
        self.out_dir = out_dir
        self.wait_for_all_workers = wait_for_all_workers
        self.sync_timeout = sync_timeout
        self.ready_timeout = ready_timeout
        self.first_message_timeout = first_message_timeout  # a new stream's Register must come this soon
        self.max_pending = max_pending  # streams open at once that have not registered yet
        self._pending = 0
        if chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes  # parameters larger than this go chunked to clients that read chunks
        self._buffers = BufferPool()  # for chunked gradients, every stream's
        self._sent_at: dict[int, float] = {}  # when each worker was last sent parameters
        self.counters = Counters()
        self.connections: dict[int, Connection] = {}
        self.ever_assigned: set[int] = set()
        self.worker_slowdowns: dict[int, float] = {}  # what each worker said of itself when it registered
        self.started = core.started
        self.finished = asyncio.Event()
        self.final_fetched = asyncio.Event()  # GetParameters has served the final parameters
        self._start_time = time.monotonic()
        self._refusals = LimitedLog(logger, "refused workers and malformed first messages")
        self._rejections = LimitedLog(logger, "rejected messages", burst=30)
        self.recorder = RunRecorder(metrics, log_every=log_every, total_iterations=core.total_iterations,
                                    clock=self.uptime, say=logger.info, epoch=core.epoch)
        self.checkpoints = Checkpointer(out_dir, checkpoint_every, self.state_dict)
        self._finish_task: asyncio.Task | None = None
        self.diverged: str | None = None  # why the run diverged, once it has
        self.faults = FaultBook(core.num_workers)  # non-finite gradients per worker id

    # ----- the run's configuration as workers see it --------------------------------------
    def pb_run_config(self) -> pb.RunConfig:
        run = self.run
        return pb.RunConfig(
            algorithm=run.algo, model=run.model_name, dataset=run.dataset, num_classes=self.num_classes,
            batch_size=run.batch_size, weight_decay=run.weight_decay, seed=run.seed,
            total_iterations=self.core.total_iterations, num_workers=run.workers,
            num_parameters=self.core.w.numel(),
        )

    # ----- Train: one stream per worker -----------------------------------------------------
    async def Train(self, request_iterator: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> None:
        # Until it registers, a stream is anyone's: at most `max_pending` of them at once, each for at most
        # `first_message_timeout` seconds (what gRPC holds of its first message is bounded by the receive limit).
        if self._pending >= self.max_pending:
            self._refusals.warning("refused a stream from %s: %d streams have not registered yet",
                                   shorten(context.peer()), self._pending)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._pending} Train streams have not registered yet (at most {self.max_pending} "
                                "at once); try again")
            return
        self._pending += 1
        try:
            first = (await asyncio.wait_for(anext(aiter(request_iterator)), self.first_message_timeout)).message
        except StopAsyncIteration:
            return
        except TimeoutError:
            self._refusals.warning("no Register from %s within %gs: stream closed", shorten(context.peer()),
                                   self.first_message_timeout)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Register within {self.first_message_timeout:g}s of opening the stream")
            return
        except DecodeError as e:
            self._refusals.warning("malformed first message from %s: %s", shorten(context.peer()), shorten(e, 200))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}")
            return
        finally:
            self._pending -= 1
        if self.ended:
            with contextlib.suppress(grpc.aio.InternalError, grpc.aio.UsageError):  # (already gone)
                await context.write(self._stop_message())
            return
        try:
            conn = self._admit(first, context.peer())
        except Rejected as e:
            self._refusals.warning("refused a worker from %s: %s", shorten(context.peer()), shorten(e.message, 200))
            await context.abort(e.code, e.message)
            return
        reader = asyncio.create_task(self._read(conn, request_iterator, context), name=f"reader-{conn.worker}")
        not_ready = asyncio.get_running_loop().call_later(self.ready_timeout, self._not_ready, conn)
        try:
            while conn.ending is None:
                await conn.wakeup.wait()
                conn.wakeup.clear()
                await self._write(conn, context)
            if conn.ending == "stop":
                # Let the worker read the Stop and close its side; gradients still in flight are dropped.
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(reader), timeout=5.0)
            if conn.error is not None:
                # abort() sends the status at once: free the worker's slot first, so a worker that
                # reconnects as soon as it reads the status is not refused with ALREADY_EXISTS.
                self._disconnect(conn)
                reader.cancel()
                await context.abort(conn.error.code, conn.error.message)
        finally:
            not_ready.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._disconnect(conn)

    async def _write(self, conn: Connection, context: grpc.aio.ServicerContext) -> None:
        """Write the worker's outbox, in order (one writer at a time), up to END_STREAM or a Stop, which end the
        stream: the handler is woken to end it. A worker that went away ends it too (nothing to write to)."""
        async with conn.writing:
            while conn.outbox and conn.ending is None:
                msg = conn.outbox.popleft()
                if msg is END_STREAM:
                    conn.ending = "end"
                    break
                try:
                    await context.write(msg)
                except (grpc.aio.InternalError, grpc.aio.UsageError) as e:  # the worker went away meanwhile
                    logger.debug("worker %d: stream gone while writing to it: %r", conn.worker, e)
                    conn.outbox.clear()
                    conn.ending = "end"
                    break
                if isinstance(msg, pb.ServerMessage) and msg.WhichOneof("payload") == "stop":
                    conn.ending = "stop"
        if conn.ending is not None:
            conn.wakeup.set()

    @property
    def ended(self) -> bool:
        """The run is over: it reached its last iteration, or it diverged."""
        return self.core.done or self.diverged is not None

    def _stop_message(self) -> pb.ServerMessage:
        if self.diverged is not None:
            return pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_DIVERGED, detail=self.diverged))
        return pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_DONE,
                                             detail=f"run finished after {self.core.iteration} iterations"))

    async def _read(self, conn: Connection, request_iterator: AsyncIterator[Received],
                    context: grpc.aio.ServicerContext) -> None:
        try:
            async for msg in request_iterator:
                conn.reading = True  # the answers to this message are written below, by this task
                try:
                    self._on_message(conn, msg)
                except Rejected as e:
                    conn.reading = False
                    self._rejections.warning("worker %d: %s (%s)", conn.worker, shorten(e.message, 300), e.code.name)
                    if self.diverged is not None:  # this refusal ended the run: say so, not only refuse
                        conn.send(self._stop_message())
                        return
                    conn.error = e
                    conn.send(END_STREAM)
                    return
                finally:
                    conn.reading = False
                if self.ended and self._finish_task is None:
                    # Owned by the service, not this stream: a worker hanging up must not cut it short.
                    self._finish_task = asyncio.get_running_loop().create_task(self._finish())
                if conn.outbox:
                    await self._write(conn, context)
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, grpc.aio.AbortError):  # the worker went away, or its stream was ended
            pass
        except DecodeError as e:
            self._rejections.warning("worker %d: malformed message: %s", conn.worker, shorten(e, 200))
            self.counters.reject("malformed")
            conn.error = Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}")
        except Exception:  # a bug must end this stream with a status, not leave it hanging
            logger.exception("worker %d: unexpected error handling a message", conn.worker)
            conn.error = Rejected(grpc.StatusCode.INTERNAL, "internal error in the parameter server")
        conn.send(END_STREAM)

    def _on_message(self, conn: Connection, received: Received) -> None:
        """Take one message (a piece of a chunked tensor, or a whole one) and, once whole, handle it: Ready, or a
        gradient to decode and apply, then route the answers. No await: atomic on the loop."""
        kind = received.message.WhichOneof("payload")
        if not conn.incoming.receiving and kind != "chunk":
            expected = "a Gradient" if conn.ready else "Ready"
            if kind != ("gradient" if conn.ready else "ready"):
                self.counters.reject("malformed")
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"expected {expected} on the Train stream, got {kind or 'an empty message'}")
        try:
            whole = conn.incoming.take(received)
        except TransportError as e:  # (a tensor being received is dropped)
            self.counters.reject(e.reason)
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, e.message) from None
        if whole is not None:  # its bytes are read within this call, before any other message's
            self._on_whole(conn, whole)

    def _expected_tensor(self, conn: Connection, name: str, message: pb.WorkerMessage) -> tuple[int, int]:
        """What a chunked tensor on `conn` must be (numel, dtype), checked on its header before its bytes come: a
        gradient is the run's parameters' size; a client model's initial parameters its declared layout's."""
        if name == "gradient":
            return self.core.w.numel(), dtype_to_pb(self.core.w.dtype)
        return self._initial_numel(conn, message.ready), pb.DTYPE_FLOAT32

    def _on_whole(self, conn: Connection, received: Received) -> None:
        """A whole message (its tensor's bytes beside it when it came in chunks): Ready, or a gradient."""
        msg = received.message
        if msg.WhichOneof("payload") == "ready":
            self._on_ready(conn, msg.ready, received.tensor_data)
            return
        g = msg.gradient
        core = self.core
        if self.ended:
            return  # in flight when the run ended: dropped
        try:
            # copy=False: the core only reads the gradient, within this call (no await in between)
            grad = decode(g.tensor, expected_numel=core.w.numel(), expected_dtype=core.w.dtype, copy=False,
                          data=received.tensor_data)
        except CodecError as e:
            self.counters.reject("tensor")
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"bad gradient tensor: {e}") from None
        ite = g.iteration_index
        before = core.iteration
        try:
            dispatches = core.push(conn.worker, grad, ite)
        except PushRejected as e:
            self.counters.reject(e.reason)
            if e.reason in DIVERGING:
                verdict = self.faults.nonfinite(conn.worker)
                if verdict.run_diverged:
                    self._diverge(f"{self.faults.describe()}; the last, from worker {conn.worker}: {e}")
                elif verdict.drop_worker:
                    self.counters.dropped_workers += 1
                    streak = self.faults.streaks[conn.worker]
                    logger.warning("worker %d (%s) dropped: %d gradients in a row from it were non-finite or would "
                                   "have made the parameters non-finite (the last: %s); the run goes on",
                                   conn.worker, conn.name, streak, shorten(e, 200))
                    raise Rejected(grpc.StatusCode.ABORTED,
                                   f"worker {conn.worker} dropped: {streak} gradients in a row from it were "
                                   f"non-finite or would have made the parameters non-finite (the last: {e}); "
                                   "the run goes on without it") from None
            raise Rejected(getattr(grpc.StatusCode, e.code), str(e)) from None
        self.faults.applied(conn.worker)
        if core.iteration == before:  # valid but ignored by the rule (Ringmaster: too stale); the current w goes back
            self.counters.gradients_discarded += 1
            self._route(dispatches)
            return
        self.counters.gradients_applied += 1
        self._route(dispatches)
        self._record(g.loss, core.iteration - 1 - ite)
        if self.recorder.diverged_at is not None and self.diverged is None:
            self._diverge(f"the training loss ran away (more than {DIVERGENCE_FACTOR:g}x that of the first "
                          "iterations)")

    def _diverge(self, why: str) -> None:
        """End the run as diverged: the parameters stay the last finite ones; every worker is told."""
        self.diverged = f"the run diverged at iteration {self.core.iteration}: {why}"
        logger.error("%s", self.diverged)
        if self.recorder.diverged_at is None:
            self.recorder.diverged(self.core.iteration, why)
        if self._finish_task is None:
            self._finish_task = asyncio.get_running_loop().create_task(self._finish())

    def _route(self, dispatches: list[Dispatch]) -> None:
        """Serialize each dispatch now (its tensor is live), once per form its receivers read (whole, or
        chunked), and queue the bytes for every receiver."""
        for d in dispatches:
            forms: dict[int, list[bytes]] = {}
            now = time.monotonic()
            for w in d.workers:
                self._sent_at[w] = now
                conn = self.connections.get(w)
                if conn is None:
                    continue
                messages = forms.get(conn.sender.chunk_bytes)
                if messages is None:
                    messages = forms[conn.sender.chunk_bytes] = conn.sender.parameters(
                        d.params, d.iteration_index, self.core.epoch)
                for msg in messages:
                    conn.send(msg)

    def _disconnect(self, conn: Connection) -> None:
        if self.connections.get(conn.worker) is not conn:
            return
        del self.connections[conn.worker]
        if self.core.started and not self.ended:
            self._route(self.core.deactivate(conn.worker))
        logger.info("worker %d disconnected, %d connected", conn.worker, len(self.connections))

    def drop_silent_workers(self) -> list[int]:
        """Synchronous runs: drop from the barrier every worker silent for more than `sync_timeout` seconds
        while others wait; the round completes with the rest. A dropped worker rejoins by reconnecting."""
        core = self.core
        if self.sync_timeout is None or core.scheduler != "sync" or not core.waiting_set or core.done:
            return []
        now = time.monotonic()
        silent = [k for k in core.active_workers() if k not in core.waiting_set
                  and now - self._sent_at.get(k, now) > self.sync_timeout]
        for k in silent:
            logger.warning("worker %d silent for more than %.1fs: dropped from the synchronous barrier",
                           k, self.sync_timeout)
            self.counters.dropped_workers += 1
            self._route(core.deactivate(k))
        return silent

    async def watch_barrier(self, interval: float | None = None) -> None:
        """Background task: `drop_silent_workers` every `interval` seconds."""
        if self.sync_timeout is None:
            return
        interval = interval or max(0.05, min(1.0, self.sync_timeout / 4))
        while not self.finished.is_set():
            await asyncio.sleep(interval)
            self.drop_silent_workers()

    # ----- progress, metrics, checkpoints ---------------------------------------------------
    def _record(self, loss: float, delay: int) -> None:
        core = self.core
        self.recorder.gradient(core.iteration, core.epoch, core.lr(), loss, delay,
                               workers_connected=len(self.connections),
                               gradients_rejected=self.counters.gradients_rejected)
        self.checkpoints.due()

    def state_dict(self) -> dict[str, Any]:
        """Snapshot of everything a resumed server needs (taken on the loop: consistent)."""
        return {
            "core": self.core.state_dict(),
            "run": self.run.to_dict(),
            "counters": vars(self.counters).copy(),
            "ever_assigned": sorted(self.ever_assigned),
            "recorder": self.recorder.state_dict(),
            "layout": layouts.to_state(self.layout) if self.layout is not None else None,
            "faults": self.faults.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed run: every worker must reconnect, and what was in flight is lost."""
        saved = layouts.from_state(state["layout"]) if state.get("layout") is not None else None  # since layouts
        if saved is not None and self.layout is not None and layouts.mismatch(self.layout, saved):
            raise ValueError(f"the checkpoint's parameter layout is not the model's: "
                             f"{layouts.mismatch(saved, self.layout)}")
        self.layout = self.layout or saved
        if not self.core.has_parameters and state["core"]["w"].numel():  # a run whose model a client brought
            self.core.set_initial_params(state["core"]["w"])
        self.core.load_state_dict(state["core"])
        self.counters = Counters(**state["counters"])
        self.ever_assigned = set(state["ever_assigned"])
        if "faults" in state:  # checkpoints of earlier versions have none
            self.faults.load_state_dict(state["faults"])
        if "recorder" in state:  # checkpoints of earlier versions have none
            self.recorder.load_state_dict(state["recorder"])
        self.started = self.core.started
        self.checkpoints.iteration = self.core.iteration
        if self.core.started:
            self.core.deactivate_all()

    async def checkpoint(self) -> Path | None:
        """Write checkpoint.pt now (see `Checkpointer.write`)."""
        return await self.checkpoints.write()

    async def _finish(self) -> None:
        """The run ended (its last iteration, or divergence): stop every worker, write the final state and
        the summary."""
        stop = self._stop_message()
        for conn in self.connections.values():
            conn.send(stop)
        self.recorder.finish_epoch()
        await self.checkpoints.write_or_fail("the final checkpoint")
        if self.out_dir:
            params = self.core.current_params().clone()
            try:
                await asyncio.to_thread(self._save_final, params, self.core.iteration)
            except OSError as e:
                self.checkpoints.failed("final.pt", e.strerror or str(e))
        self.recorder.summary(self.core.summary(), gradients_applied=self.counters.gradients_applied,
                              gradients_rejected=self.counters.gradients_rejected,
                              rejected_by_reason=self.counters.rejected_by_reason,
                              worker_slowdowns=[self.worker_slowdowns.get(k, 1.0) for k in range(self.core.num_workers)])
        if self.diverged is None:
            logger.info("run finished at iteration %d", self.core.iteration)
        self.finished.set()  # set last: whoever waits for it finds the final files written

    def _save_final(self, params: torch.Tensor, iteration: int) -> None:
        state = self.model_state(params) if self.model_state is not None else None
        save_final(self.out_dir, params, iteration, self.run.to_dict(), model_state=state)

    async def aclose(self) -> None:
        """Wait for a checkpoint still being written and close the metrics (the server's last act)."""
        await self.checkpoints.aclose()
        if self.recorder.metrics is not None:
            self.recorder.metrics.close()

    async def shutdown(self, detail: str = "server shutting down") -> None:
        """Graceful stop before the end of the run: checkpoint, then tell the workers."""
        if not self.finished.is_set():
            await self.checkpoints.write_or_fail("the checkpoint on shutdown")
        stop = pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_SHUTDOWN, detail=detail))
        for conn in list(self.connections.values()):
            conn.send(stop)

    def uptime(self) -> float:
        return time.monotonic() - self._start_time

    # ----- unary calls ---------------------------------------------------------------------
    async def GetParameters(self, request: pb.GetParametersRequest, context) -> pb.Parameters:
        core = self.core
        reply = pb.Parameters(tensor=encode(core.current_params()), iteration_index=core.iteration, epoch=core.epoch)
        if self.finished.is_set() and not request.training_client:
            self.final_fetched.set()
        return reply

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.Status:
        core = self.core
        return pb.Status(
            iteration=core.iteration, epoch=core.epoch, workers_connected=len(self.connections),
            gradients_applied=self.counters.gradients_applied, gradients_rejected=self.counters.gradients_rejected,
            done=self.ended, diverged=self.diverged is not None, config=self.pb_run_config(),
            uptime_seconds=time.monotonic() - self._start_time,
            train_loss=nan_if_none(self.recorder.last_epoch_train_loss),
            gradients_discarded=self.counters.gradients_discarded,
        )


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


def add_to_server(service: ParameterServerService, server: grpc.aio.Server) -> None:
    """Register the service: Train with the hand-framed tensor (de)serializers of `common.wire` (one copy
    of the tensor per direction instead of three or four), the unary calls as generated."""
    handlers = {
        "Train": grpc.stream_stream_rpc_method_handler(
            service.Train, request_deserializer=parse_worker_message, response_serializer=serialize_message),
        "GetParameters": grpc.unary_unary_rpc_method_handler(
            service.GetParameters, request_deserializer=pb.GetParametersRequest.FromString,
            response_serializer=pb.Parameters.SerializeToString),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            service.GetStatus, request_deserializer=pb.GetStatusRequest.FromString,
            response_serializer=pb.Status.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
