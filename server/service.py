"""The service of one run: one asyncio event loop drives ServerCore, the only writer.

Each worker has one bidirectional `Train` stream (server/stream.py). Its reader hands each message to the
service, which decodes it and calls `ServerCore.push` directly: code between two `await`s is atomic on one
loop, so the core needs no lock, gradients are applied in arrival order, and the parameters a push returns are
encoded before anything else can run. The service is composed of named parts: who may join and with what
(`Admission`, server/admission.py), how the run ends (`RunLifecycle`, server/lifecycle.py), whose fault a
non-finite gradient is (`FaultBook`, server/faults.py), when checkpoints are written (`Checkpointer`), and its
books (`RunRecorder`); the gRPC servicer is a thin adapter over it (server/servicer.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from ormo_ps.common import layout as layouts
from ormo_ps.common import wire_dtype as wire_dtypes
from ormo_ps.common.chunks import DEFAULT_CHUNK_BYTES, BufferPool
from ormo_ps.common.codec import CodecError, decode, encode
from ormo_ps.common.layout import Layout
from ormo_ps.common.log_limit import LimitedLog, shorten
from ormo_ps.common.metrics import DIVERGENCE_FACTOR, MetricsWriter, RunRecorder
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.transport import TransportError
from ormo_ps.common.wire import Received
from ormo_ps.server.admission import Admission
from ormo_ps.server.checkpointer import Checkpointer
from ormo_ps.server.core import Dispatch, PushRejected, ServerCore
from ormo_ps.server.faults import FaultBook
from ormo_ps.server.front import PushOutcome, ShardFront, ShardLost
from ormo_ps.server.lifecycle import RunLifecycle
from ormo_ps.server.stream import END_STREAM, Connection, Rejected, WorkerStream

logger = logging.getLogger(__name__)

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


@dataclass
class Traffic:
    """Bytes of the service's gRPC messages, as they cross its (de)serializers (server/servicer.py): requests
    received and answers sent, on every method (Train's tensors, GetParameters' too), without gRPC's framing."""

    received_bytes: int = 0
    sent_bytes: int = 0


class ParameterServerService:
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
        self.run = core.run
        self.num_classes = num_classes
        self.sync_timeout = sync_timeout
        self._sent_at: dict[int, float] = {}  # when each worker was last sent parameters
        self.seen_at: dict[int, float] = {}  # Unix time of each worker's last message (its metrics' last-seen)
        self.counters = Counters()
        self.traffic = Traffic()
        self.faults = FaultBook(core.num_workers)  # non-finite gradients per worker id
        self._start_time = time.monotonic()
        self._rejections = LimitedLog(logger, "rejected messages", burst=30)
        self.recorder = RunRecorder(metrics, log_every=log_every, total_iterations=core.total_iterations,
                                    clock=self.uptime, say=logger.info, epoch=core.epoch)
        self.checkpoints = Checkpointer(out_dir, checkpoint_every, self.state_dict)
        # A sharded server (server/front.py): the core is the coordinator's ShardFront; the tensors go to the shards.
        self.sharded = isinstance(core, ShardFront)
        self.shard_addresses: list[str] | None = None  # as workers are told them (Welcome.shards)
        self.resume_state: dict[str, Any] | None = None  # the checkpoint a sharded service loads once connected
        self.admission = Admission(
            core, layout=layout, pb_run_config=self.pb_run_config, route=self._route, ended=lambda: self.ended,
            stop_message=lambda: self.lifecycle.stop_message(), buffers=BufferPool(), chunk_bytes=chunk_bytes,
            wait_for_all_workers=wait_for_all_workers, ready_timeout=ready_timeout,
            first_message_timeout=first_message_timeout, max_pending=max_pending,
            on_welcome=self._shards_welcome if self.sharded else None)
        self.lifecycle = RunLifecycle(core, self.recorder, self.checkpoints, self.admission.connections,
                                      out_dir=out_dir, model_state=model_state, summary_extras=self._summary_extras,
                                      params=self._params)
        if self.sharded:
            core.on_outcome = self._on_outcome
            core.on_lost = self.lifecycle.abort
            core.halted = lambda: self.ended
            core.on_dispatch = self._route

    # ----- the parts' state, as the service's ------------------------------------------------
    @property
    def connections(self) -> dict[int, Connection]:
        return self.admission.connections

    @property
    def layout(self) -> Layout | None:
        return self.admission.layout

    @property
    def started(self) -> bool:
        return self.admission.started

    @property
    def ever_assigned(self) -> set[int]:
        return self.admission.ever_assigned

    @property
    def worker_slowdowns(self) -> dict[int, float]:
        return self.admission.worker_slowdowns

    @property
    def chunk_bytes(self) -> int:
        return self.admission.chunk_bytes

    @property
    def _pending(self) -> int:
        return self.admission.pending

    @property
    def diverged(self) -> str | None:
        return self.lifecycle.diverged

    @property
    def finished(self) -> asyncio.Event:
        return self.lifecycle.finished

    @property
    def final_fetched(self) -> asyncio.Event:
        return self.lifecycle.final_fetched

    @property
    def ended(self) -> bool:
        """The run is over: it reached its last iteration, or it diverged."""
        return self.lifecycle.ended

    # ----- the run's configuration as workers see it --------------------------------------
    def pb_run_config(self) -> pb.RunConfig:
        run = self.run
        return pb.RunConfig(
            algorithm=run.algo, model=run.model_name, dataset=run.dataset, num_classes=self.num_classes,
            batch_size=run.batch_size, weight_decay=run.weight_decay, seed=run.seed,
            total_iterations=self.core.total_iterations, num_workers=run.workers,
            num_parameters=self.core.numel, wire_dtype=wire_dtypes.to_pb(run.wire_torch_dtype),
        )

    # ----- Train: one stream per worker -----------------------------------------------------
    async def train(self, requests: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> None:
        """One worker's Train stream: admitted (or answered) by Admission, then read and written by its
        WorkerStream until it ends; a registered worker that does not say Ready in time is let go."""
        conn = await self.admission.open(requests, context)
        if conn is None:
            return
        if self.sharded:  # its shards must know its session before its streams to them open
            try:
                await self.core.admitted(conn.worker)
            except ShardLost as e:
                self.disconnect(conn)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the sharded server lost a shard: {e}")
                return
        not_ready = asyncio.get_running_loop().call_later(self.admission.ready_timeout, self.admission.not_ready,
                                                          conn)
        try:
            await WorkerStream(conn, requests, context, self, self._rejections).run()
        finally:
            not_ready.cancel()

    # ----- what a stream asks of the service (ormo_ps.server.stream.StreamOwner) ------------------------
    def refusal_stop(self) -> pb.ServerMessage | None:
        return self.lifecycle.stop_message() if self.diverged is not None else None

    def after_message(self) -> None:
        self.lifecycle.finish_if_ended()

    def count_malformed(self) -> None:
        self.counters.reject("malformed")

    def disconnect(self, conn: Connection) -> None:
        if self.connections.get(conn.worker) is not conn:
            return
        del self.connections[conn.worker]
        if self.sharded:
            self.core.disconnect(conn.worker, deactivate=self.core.started and not self.ended)
        elif self.core.started and not self.ended:
            self._route(self.core.deactivate(conn.worker))
        logger.info("worker %d disconnected, %d connected", conn.worker, len(self.connections))

    def on_message(self, conn: Connection, received: Received) -> None:
        """Take one message (a piece of a chunked tensor, or a whole one) and, once whole, handle it: Ready, or a
        gradient to decode and apply, then route the answers. No await: atomic on the loop."""
        self.seen_at[conn.worker] = time.time()
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

    def _on_whole(self, conn: Connection, received: Received) -> None:
        """A whole message (its tensor's bytes beside it when it came in chunks): Ready, or a gradient."""
        msg = received.message
        if msg.WhichOneof("payload") == "ready":
            self.admission.on_ready(conn, msg.ready, received.tensor_data)
            return
        g = msg.gradient
        core = self.core
        if self.ended:
            return  # in flight when the run ended: dropped
        if self.sharded:
            self.counters.reject("malformed")
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "this server is sharded: a gradient goes to its "
                           "shards, in slices (Welcome.shards), not to the coordinator")
        wire = self.run.wire_torch_dtype
        try:
            # copy=False: the core only reads the gradient, within this call (no await in between); a bfloat16 or
            # float16 one is widened to the parameters' float32, exactly
            grad = decode(g.tensor, expected_numel=core.numel, expected_dtype=wire, copy=False,
                          data=received.tensor_data)
            if grad.dtype != core.w.dtype:
                grad = self.admission.scratch.widen(grad, core.w.dtype)  # (read by the push below, then free)
        except CodecError as e:
            self.counters.reject("tensor")
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"bad gradient tensor: {e}") from None
        ite = g.iteration_index
        before = core.iteration
        try:
            dispatches = core.push(conn.worker, grad, ite)
        except PushRejected as e:
            self._refused(conn, e)  # (raises)
        self.faults.applied(conn.worker)
        if core.iteration == before:  # valid but ignored by the rule (Ringmaster: too stale); the current w goes back
            self.counters.gradients_discarded += 1
            self._route(dispatches)
            return
        self.counters.gradients_applied += 1
        self._route(dispatches)
        self._record(g.loss, core.iteration - 1 - ite)

    def _on_outcome(self, outcome: PushOutcome) -> None:
        """A sharded push decided (server/front.py): booked as one server books a push; a refused one ends the
        worker's stream with its status, as one server's refusal does."""
        conn = self.connections.get(outcome.worker)
        if conn is None or conn.session != outcome.session:
            conn = None  # (gone meanwhile: its books are kept all the same)
        if outcome.rejected is not None:
            try:
                self._refused(conn, outcome.rejected, worker=outcome.worker)
            except Rejected as e:
                if conn is not None:
                    self._rejections.warning("worker %d: %s (%s)", conn.worker, shorten(e.message, 300), e.code.name)
                    stop = self.refusal_stop()
                    if stop is not None:
                        conn.send(stop)
                    else:
                        conn.error = e
                        conn.send(END_STREAM)
            self.after_message()
            return
        self.faults.applied(outcome.worker)
        if outcome.discarded:
            self.counters.gradients_discarded += 1
        else:
            self.counters.gradients_applied += 1
            self._record(outcome.loss, self.core.iteration - 1 - outcome.iteration_index)
        self.after_message()

    def _refused(self, conn: Connection | None, e: PushRejected, worker: int | None = None) -> None:
        """Book a refused push and raise the `Rejected` that ends the worker's stream (or a Stop when the refusal
        ended the run)."""
        worker = conn.worker if conn is not None else worker
        name = conn.name if conn is not None else "gone"
        wire = self.run.wire_torch_dtype
        self.counters.reject(e.reason)
        if e.reason in DIVERGING:
            verdict = self.faults.nonfinite(worker)
            if verdict.run_diverged:
                self.lifecycle.diverge(f"{self.faults.describe()}; the last, from worker {worker}: {e}")
            elif verdict.drop_worker:
                self.counters.dropped_workers += 1
                streak = self.faults.streaks[worker]
                logger.warning("worker %d (%s) dropped: %d gradients in a row from it were non-finite or would "
                               "have made the parameters non-finite (the last: %s); the run goes on",
                               worker, name, streak, shorten(e, 200))
                raise Rejected(grpc.StatusCode.ABORTED,
                               f"worker {worker} dropped: {streak} gradients in a row from it were "
                               f"non-finite or would have made the parameters non-finite (the last: {e}); "
                               "the run goes on without it") from None
        hint = wire_dtypes.overflow_hint(wire) if e.reason == "nonfinite" else ""
        raise Rejected(getattr(grpc.StatusCode, e.code), f"{e}{hint}") from None

    def _route(self, dispatches: list[Dispatch]) -> None:
        """Serialize each dispatch now (its tensor is live), once per form its receivers read (whole, or
        chunked), and queue the bytes for every receiver. (A sharded server's shards send the parameters: its
        coordinator only notes when each worker was sent them, for the synchronous barrier's timeout.)"""
        if self.sharded:
            now = time.monotonic()
            for d in dispatches:
                self._sent_at.update((w, now) for w in d.workers)
            return
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
                    try:
                        messages = forms[conn.sender.chunk_bytes] = conn.sender.parameters(
                            d.params, d.iteration_index, self.core.epoch)
                    except CodecError as e:  # the parameters outgrew the float16 wire: no worker can hold them
                        self.lifecycle.diverge(str(e))
                        return
                for msg in messages:
                    conn.send(msg)

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
        if self.recorder.diverged_at is not None and self.diverged is None:
            self.lifecycle.diverge(f"the training loss ran away (more than {DIVERGENCE_FACTOR:g}x that of the "
                                   "first iterations)")

    def _shards_welcome(self, conn: Connection, welcome: pb.Welcome) -> None:
        """A sharded server's Welcome: the shards and the worker's session (announced to them)."""
        conn.session = welcome.session = self.core.new_session(conn.worker, conn.name)
        welcome.shards.extend(self.core.endpoints(self.shard_addresses))

    async def _params(self) -> tuple[torch.Tensor, int]:
        """(w_t, t): a copy (a sharded server's, put together from its shards at one point of the order)."""
        if self.sharded:
            return await self.core.fetch_params()
        return self.core.current_params().clone(), self.core.iteration

    def state_dict(self) -> dict[str, Any] | Any:
        """Snapshot of everything a resumed server needs (taken on the loop: consistent). A sharded server's is
        awaitable: its shards write their states at this point of the order, and the manifest names them."""
        if self.sharded:
            return self._sharded_state(self._state_dict())
        return self._state_dict()

    async def _sharded_state(self, state: dict[str, Any]) -> dict[str, Any]:
        try:
            state["shards"] = await self.core.checkpoint_shards(self.checkpoints.out_dir)
        except ShardLost as e:
            raise OSError(f"a shard could not write its state: {e}") from None
        return state

    def _state_dict(self) -> dict[str, Any]:
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
        self.admission.layout = self.layout or saved
        if not self.core.has_parameters and state["core"]["w"].numel():  # a run whose model a client brought
            self.core.set_initial_params(state["core"]["w"])
        self.core.load_state_dict(state["core"])
        self.counters = Counters(**state["counters"])
        self.admission.ever_assigned = set(state["ever_assigned"])
        if "faults" in state:  # checkpoints of earlier versions have none
            self.faults.load_state_dict(state["faults"])
        if "recorder" in state:  # checkpoints of earlier versions have none
            self.recorder.load_state_dict(state["recorder"])
        self.admission.started = self.core.started
        self.checkpoints.iteration = self.core.iteration
        if self.core.started:
            self.core.deactivate_all()

    async def checkpoint(self) -> Path | None:
        """Write checkpoint.pt now (see `Checkpointer.write`)."""
        return await self.checkpoints.write()

    def _summary_extras(self) -> dict[str, Any]:
        """The service's counts for the run's summary record (the core's come with core.summary())."""
        return dict(gradients_applied=self.counters.gradients_applied,
                    gradients_rejected=self.counters.gradients_rejected,
                    rejected_by_reason=self.counters.rejected_by_reason,
                    worker_slowdowns=[self.worker_slowdowns.get(k, 1.0) for k in range(self.core.num_workers)])

    async def aclose(self) -> None:
        """Wait for a checkpoint still being written and close the metrics (the server's last act)."""
        await self.checkpoints.aclose()
        if self.recorder.metrics is not None:
            self.recorder.metrics.close()

    async def shutdown(self, detail: str = "server shutting down") -> None:
        """Graceful stop before the end of the run: checkpoint, then tell the workers."""
        await self.lifecycle.shutdown(detail)

    def uptime(self) -> float:
        return time.monotonic() - self._start_time

    # ----- unary calls ---------------------------------------------------------------------
    async def parameters(self, request: pb.GetParametersRequest) -> pb.Parameters:
        """The current parameters. An evaluator's fetch once the run has ended (its last iteration, or diverged) is
        of the final ones: the server may go once its final files are written (even when the fetch came while
        they were being written, as a sharded server's can)."""
        core = self.core
        final = self.ended  # (before any await: the parameters fetched are then the final ones)
        if self.sharded:
            params, iteration = await core.fetch_params()
            reply = pb.Parameters(tensor=encode(params), iteration_index=iteration,
                                  epoch=core.lr_schedule.epoch(iteration))
        else:
            reply = pb.Parameters(tensor=encode(core.current_params()), iteration_index=core.iteration,
                                  epoch=core.epoch)
        if final and not request.training_client:
            self.final_fetched.set()
        return reply

    def status(self) -> pb.Status:
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
