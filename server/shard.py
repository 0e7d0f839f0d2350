"""A shard of a sharded server: one contiguous slice of the flat parameter vector, its slice of the rule's state,
and the same update rule run on it, on its own event loop (lock-free inside, as one server's).

A shard serves two things (proto/ps/v1/parameter_server.proto):

- `ShardControl.Follow`, opened by its coordinator (server/front.py): the run it serves a slice of
  (`ShardAttach`), then commands in the one global order: admit a worker's session, start, rejoin, deactivate,
  push (apply a held slice), drop, snapshot, checkpoint, load, finish. Only these change the shard's core, so
  every shard's core makes the same decisions as every other's and as one server's would.
- `ParameterServer.Train`, one stream per worker (admitted only for the session its coordinator announced):
  the worker's slices of its gradients come in, each checked (size, dtype, finite) and held, its verdict
  reported to the coordinator; the slices of the parameters the core sends go out.

The coordinator gone (its stream ended): the shard forgets the run (its state may be ahead of the last
checkpoint) and closes every worker stream; a coordinator that comes back attaches afresh and loads the
checkpoint it resumes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from ormo_ps.common import wire_dtype as wire_dtypes
from ormo_ps.common.chunks import BufferPool
from ormo_ps.common.codec import CodecError, decode, encode
from ormo_ps.common.log_limit import LimitedLog, shorten
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.tensor_checks import check_finite, max_magnitude
from ormo_ps.common.transport import Receiver, Sender, TransportError
from ormo_ps.common.wire import Received
from ormo_ps.server.checkpoint import load_checkpoint, save_state, state_digest
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import Dispatch, PushRejected, ServerCore
from ormo_ps.server.stream import END_STREAM, Connection, Rejected, WorkerStream

logger = logging.getLogger(__name__)


class CommandFailed(Exception):
    """A command the shard cannot carry out: reported to the coordinator, which stops the run."""


@dataclass
class Held:
    """A worker's checked slice, waiting for its place in the order (ShardPush) or its refusal (ShardDrop)."""

    session: int
    iteration_index: int


@dataclass
class Trial:
    """A push applied with the state saved, waiting for ShardResolve."""

    worker: int
    iteration_index: int
    lr: float
    saved: tuple[torch.Tensor, dict[str, Any]]


class ShardService:
    """One shard: its core (None until attached), its workers' streams, its coordinator's stream."""

    def __init__(self, *, first_message_timeout: float = 30.0, exit_after_run: bool = False) -> None:
        self.core: ServerCore | None = None
        self.exit_after_run = exit_after_run  # stop once a coordinator that finished its run detaches
        self.run_finished = False  # the coordinator said the run is over (ShardFinish)
        self.done = asyncio.Event()  # (exit_after_run) a finished run's coordinator detached
        self.attach: pb.ShardAttach | None = None
        self.run: RunConfig | None = None
        self.connections: dict[int, Connection] = {}
        self.sessions: dict[int, int] = {}  # worker -> the session its coordinator announced (ShardAdmit)
        self.held: dict[int, Held] = {}
        self.slices: dict[int, torch.Tensor] = {}  # worker -> its float32 slice buffer, used again
        self.buffers = BufferPool()
        self.first_message_timeout = first_message_timeout
        self._out: asyncio.Queue | None = None  # reports to the coordinator; None while none follows
        self._trial: Trial | None = None
        self._backlog: list[pb.ShardCommand] = []  # commands that came during a trial, in order
        self._rejections = LimitedLog(logger, "rejected messages", burst=30)
        self.pushes = 0  # counters, for logs and tests
        self.verdicts = 0

    # ----- the coordinator's stream ---------------------------------------------------------------------
    async def follow(self, commands: AsyncIterator[pb.ShardCommand], context: grpc.aio.ServicerContext) -> None:
        if self._out is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "this shard already follows a coordinator")
            return
        out: asyncio.Queue = asyncio.Queue()
        self._out = out
        logger.info("a coordinator attached from %s", shorten(context.peer()))

        async def read() -> None:
            try:
                async for command in commands:
                    self.on_command(command)
            except (grpc.aio.AioRpcError, grpc.aio.AbortError, DecodeError) as e:
                logger.warning("the coordinator's stream broke: %s", shorten(e, 200))
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read(), name="coordinator-commands")
        try:
            while (report := await out.get()) is not None:
                await context.write(report)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._out = None
            self._forget("its coordinator went away")
            if self.run_finished and self.exit_after_run:
                logger.info("the run is over and its coordinator detached: this shard exits (--exit-after-run)")
                self.done.set()
            self.run_finished = False

    def close(self) -> None:
        """The shard is stopping: end its coordinator's stream and every worker's (with a status, not a cancel)."""
        self._forget("the shard is stopping")
        if self._out is not None:
            self._out.put_nowait(None)

    def _report(self, seq: int = 0, **payload: Any) -> None:
        if self._out is not None:
            self._out.put_nowait(pb.ShardReport(seq=seq, **payload))

    def on_command(self, command: pb.ShardCommand) -> None:
        """One command, in order; during a trial push only its ShardResolve is taken, the rest waits."""
        kind = command.WhichOneof("command")
        if self._trial is not None and kind != "resolve":
            self._backlog.append(command)
            return
        try:
            self._carry_out(command, kind)
        except (CommandFailed, PushRejected, CodecError, ValueError, OSError) as e:
            logger.error("cannot carry out the coordinator's %s: %s", kind, e)
            self._report(command.seq, failed=f"shard {self._index()}: {kind}: {e}")
            return
        if kind == "resolve":
            backlog, self._backlog = self._backlog, []
            for queued in backlog:
                self.on_command(queued)

    def _index(self) -> str:
        return str(self.attach.index) if self.attach is not None else "?"

    def _carry_out(self, command: pb.ShardCommand, kind: str | None) -> None:
        if kind == "attach":
            self._attach(command.seq, command.attach)
            return
        core = self.core
        if core is None:
            raise CommandFailed(f"{kind} before the run was attached")
        body = getattr(command, kind)
        if kind == "admit":
            self.sessions[body.worker] = body.session
            self.held.pop(body.worker, None)
            old = self.connections.pop(body.worker, None)
            if old is not None:  # a stream of an earlier session: over
                old.send(END_STREAM)
            self._report(command.seq, done=True)
        elif kind == "start":
            self._route([core.start_with(set(body.ready))])
        elif kind == "rejoin":
            dispatch = core.rejoin(body.worker)
            if dispatch is not None:
                self._route([dispatch])
        elif kind == "deactivate":
            if body.end_session:
                self._end_session(body.worker)
            if body.core:
                self._route(core.deactivate(body.worker))
        elif kind == "deactivate_all":
            for worker in list(self.sessions):
                self._end_session(worker)
            core.deactivate_all()
        elif kind == "push":
            self._push(command.seq, body)
        elif kind == "resolve":
            self._resolve(body)
        elif kind == "drop":
            held = self.held.get(body.worker)
            if held is not None and held.session == body.session:
                del self.held[body.worker]
        elif kind == "snapshot":
            self._report(command.seq, slice=pb.ShardSlice(params=encode(core.w), iteration=core.iteration))
        elif kind == "checkpoint":
            self._checkpoint(command.seq, body.path)
        elif kind == "load":
            self._load(command.seq, body)
        elif kind == "finish":
            self.run_finished = True
            for conn in list(self.connections.values()):
                conn.send(pb.ServerMessage(stop=body.stop))
        else:
            raise CommandFailed(f"unknown command {kind!r}")

    def _attach(self, seq: int, attach: pb.ShardAttach) -> None:
        fields = json.loads(attach.run_json)
        # What the run trains on is its workers' and coordinator's business: a shard computes nothing with the model
        # or the data set, and need not be able to import a user's (`--model my_pkg.models:build`).
        fields.update(model=None, dataset="synthetic", data_dir=None, download=False)
        run = RunConfig.from_dict(fields)
        numel = attach.end - attach.start
        if not attach.start < attach.end <= attach.numel:
            raise CommandFailed(f"bad slice [{attach.start}, {attach.end}) of {attach.numel}")
        params = (decode(attach.params, expected_numel=numel, expected_dtype=torch.float32)
                  if attach.HasField("params") else torch.empty(0))
        self._forget("a coordinator attached afresh")
        self.run = run
        self.core = ServerCore(params, run, attach.iterations_per_epoch)
        self.attach = attach
        logger.info("shard %d/%d: %s, parameters [%d, %d) of %d, K=%d", attach.index, attach.shards, run.algo,
                    attach.start, attach.end, attach.numel, run.workers)
        self._report(seq, attached=pb.ShardAttached(bound=self.core.measured_bound()))

    def _forget(self, why: str) -> None:
        """Drop the run: every worker stream closed, nothing held."""
        if self.core is not None:
            logger.info("shard %s: %s; the run's state here is dropped", self._index(), why)
        for conn in list(self.connections.values()):
            conn.error = Rejected(grpc.StatusCode.UNAVAILABLE, f"the shard dropped the run: {why}")
            conn.send(END_STREAM)
        self.connections.clear()
        self.sessions.clear()
        self.held.clear()
        self.slices.clear()
        self._trial = None
        self._backlog = []
        self.core = None
        self.attach = None

    def _end_session(self, worker: int) -> None:
        self.sessions.pop(worker, None)
        self.held.pop(worker, None)
        conn = self.connections.pop(worker, None)
        if conn is not None:
            conn.send(END_STREAM)

    # ----- pushes, in the coordinator's order -------------------------------------------------------------
    def _push(self, seq: int, push: pb.ShardPush) -> None:
        core = self.core
        held = self.held.pop(push.worker, None)
        if held is None or held.session != push.session or held.iteration_index != push.iteration_index:
            raise CommandFailed(f"push of worker {push.worker} (session {push.session}, index "
                                f"{push.iteration_index}): no such slice is held here")
        core.check_push(push.worker, push.iteration_index)  # (the coordinator checked it: the same state)
        grad = self.slices[push.worker]
        self.pushes += 1
        if core.discarding(push.iteration_index):
            self._route(core.discard(push.worker))
            return
        lr = core.update_rate(push.iteration_index)
        if not push.trial:
            core.apply_update(grad, push.iteration_index, push.worker, lr)
            self._route(core.applied(push.worker, push.iteration_index, lr))
            return
        saved = core.save_state()
        before = core.measured_bound()
        core.apply_update(grad, push.iteration_index, push.worker, lr)
        finite = core.state_finite(lr)
        self._trial = Trial(push.worker, push.iteration_index, lr, saved)
        self._report(seq, trial=pb.ShardTrial(finite=finite, bound=core.measured_bound() if finite else before,
                                              bound_before=before))

    def _resolve(self, resolve: pb.ShardResolve) -> None:
        trial, self._trial = self._trial, None
        if trial is None:
            raise CommandFailed("resolve without a trial push")
        core = self.core
        if resolve.commit:
            self._route(core.applied(trial.worker, trial.iteration_index, trial.lr))
        else:
            core.restore_state(trial.saved)

    def _route(self, dispatches: list[Dispatch]) -> None:
        """Each dispatch's slice, serialized once per form its receivers read, queued for each receiver."""
        core = self.core
        for d in dispatches:
            forms: dict[int, list[bytes]] = {}
            for w in d.workers:
                conn = self.connections.get(w)
                if conn is None:
                    continue
                messages = forms.get(conn.sender.chunk_bytes)
                if messages is None:
                    messages = forms[conn.sender.chunk_bytes] = conn.sender.parameters(
                        d.params, d.iteration_index, core.epoch)
                for msg in messages:
                    conn.send(msg)

    # ----- checkpoints ------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        a = self.attach
        return {"index": a.index, "shards": a.shards, "start": a.start, "end": a.end, "numel": a.numel,
                "core": self.core.state_dict()}

    def _checkpoint(self, seq: int, path: str) -> None:
        state = self._state()  # a copy, taken now (in the order); written in a thread
        iteration = self.core.iteration

        async def write() -> None:
            try:
                digest = await asyncio.to_thread(save_state, Path(path), state)
            except OSError as e:
                self._report(seq, failed=f"shard {self._index()}: cannot write {path}: {e.strerror or e}")
                return
            self._report(seq, checkpointed=pb.ShardCheckpointed(path=path, sha256=digest, iteration=iteration))

        asyncio.get_running_loop().create_task(write())

    def _load(self, seq: int, load: pb.ShardLoad) -> None:
        state = load_checkpoint(load.path)
        if state_digest(state) != load.sha256:
            raise CommandFailed(f"{load.path} is not the file the checkpoint's manifest names (its digest differs)")
        a = self.attach
        if (state["index"], state["shards"], state["start"], state["end"]) != (a.index, a.shards, a.start, a.end):
            raise CommandFailed(f"{load.path} holds shard {state['index']}/{state['shards']} [{state['start']}, "
                                f"{state['end']}); this is shard {a.index}/{a.shards} [{a.start}, {a.end})")
        core = self.core
        core.load_state_dict(state["core"])
        self._report(seq, loaded=pb.ShardLoaded(iteration=core.iteration, bound=self.core.measured_bound()))

    # ----- a worker's Train stream ------------------------------------------------------------------------
    async def train(self, requests: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> None:
        try:
            first = (await asyncio.wait_for(anext(aiter(requests)), self.first_message_timeout)).message
        except (StopAsyncIteration, TimeoutError, DecodeError):
            return
        try:
            conn = self._admit(first)
        except Rejected as e:
            await context.abort(e.code, e.message)
            return
        await WorkerStream(conn, requests, context, self, self._rejections).run()

    def _admit(self, first: pb.WorkerMessage) -> Connection:
        if first.WhichOneof("payload") != "register":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message on a Train stream must be Register")
        reg = first.register
        if self.core is None:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "this shard serves no run yet (no coordinator attached)")
        worker = reg.requested_worker_id
        if not reg.HasField("requested_worker_id") or self.sessions.get(worker) != reg.session or not reg.session:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                           f"worker {worker if reg.HasField('requested_worker_id') else '(no id)'} session "
                           f"{reg.session}: not announced by this shard's coordinator; register with the "
                           "coordinator (the server's address) first")
        a = self.attach
        chunk_bytes = a.chunk_bytes if reg.accepts_chunks else 0
        wire = self.run.wire_torch_dtype
        conn = Connection(worker, shorten(reg.name, 64), reg.slowdown or 1.0,
                          sender=Sender(chunk_bytes, wire_dtype=wire))
        conn.session = reg.session
        conn.ready = True  # gradients only: the Ready goes to the coordinator
        conn.incoming = Receiver(self.buffers, chunk_bytes, why_whole="the shard's Welcome said chunk_bytes 0",
                                 expect=lambda name, message: (a.end - a.start, wire_dtypes.to_pb(wire)))
        old = self.connections.get(worker)
        if old is not None:
            old.send(END_STREAM)
        self.connections[worker] = conn
        config = pb.RunConfig(algorithm=self.run.algo, num_workers=self.run.workers, num_parameters=a.end - a.start,
                              wire_dtype=wire_dtypes.to_pb(wire))
        conn.send(pb.ServerMessage(welcome=pb.Welcome(worker_id=worker, config=config, chunk_bytes=chunk_bytes,
                                                      session=reg.session)))
        return conn

    # what a stream asks of its owner (ormo_ps.server.stream.StreamOwner)
    def refusal_stop(self) -> pb.ServerMessage | None:
        return None

    def after_message(self) -> None:
        pass

    def count_malformed(self) -> None:
        pass

    def disconnect(self, conn: Connection) -> None:
        if self.connections.get(conn.worker) is conn:
            del self.connections[conn.worker]

    def on_message(self, conn: Connection, received: Received) -> None:
        """A slice (or a piece of one): once whole, checked, held, and its verdict reported. No await."""
        kind = received.message.WhichOneof("payload")
        if not conn.incoming.receiving and kind not in ("gradient", "chunk"):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"a shard takes only gradients on the Train stream, got {kind or 'an empty message'}")
        try:
            whole = conn.incoming.take(received)
        except TransportError as e:
            self._verdict(conn, received.message.gradient, ok=False, reason=e.reason, message=e.message)
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, e.message) from None
        if whole is None:
            return
        g = whole.message.gradient
        if self.sessions.get(conn.worker) != conn.session:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "this worker's session is over")
        if conn.worker in self.held:  # (a worker sends its next gradient only once it has the parameters)
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"worker {conn.worker} sent a gradient while its previous one waits for its place in the "
                           "order: one gradient at a time")
        a = self.attach
        try:
            grad = decode(g.tensor, expected_numel=a.end - a.start, expected_dtype=self.run.wire_torch_dtype,
                          copy=False, data=whole.tensor_data)
        except CodecError as e:
            self._verdict(conn, g, ok=False, reason="tensor", message=f"bad gradient tensor: {e}")
            return
        buf = self.slices.get(conn.worker)
        if buf is None:
            buf = self.slices[conn.worker] = torch.empty(a.end - a.start, dtype=torch.float32)
        buf.copy_(grad)  # (widened from the wire dtype, exactly)
        g_max = max_magnitude(buf)
        if g_max != g_max or g_max == float("inf"):
            if not self.run.allow_nonfinite:
                try:
                    check_finite(buf, f"gradient slice [{a.start}, {a.end})")
                except CodecError as e:
                    self._verdict(conn, g, ok=False, code="INVALID_ARGUMENT", reason="nonfinite", message=str(e))
                    return
        self.held[conn.worker] = Held(conn.session, g.iteration_index)
        self._verdict(conn, g, ok=True, g_max=g_max)

    def _verdict(self, conn: Connection, g: pb.Gradient, *, ok: bool, code: str = "INVALID_ARGUMENT",
                 reason: str = "", message: str = "", g_max: float = 0.0) -> None:
        self.verdicts += 1
        self._report(verdict=pb.ShardVerdict(
            worker=conn.worker, session=conn.session, iteration_index=g.iteration_index,
            ok=ok, code="" if ok else code, reason=reason, message=message, g_max=g_max, loss=g.loss,
            sample_count=g.sample_count))


# ----- serving ---------------------------------------------------------------------------------------------
CONTROL_SERVICE = "ps.v1.ShardControl"


def add_shard_to_server(shard: ShardService, server: grpc.aio.Server) -> None:
    """A shard's handlers: ShardControl.Follow, and ParameterServer.Train with the hand-framed tensor
    (de)serializers of `ormo_ps.common.wire` (as one server's)."""
    from ormo_ps.common.wire import parse_worker_message, serialize_message
    from ormo_ps.server.servicer import SERVICE_NAME

    control = {"Follow": grpc.stream_stream_rpc_method_handler(
        shard.follow, request_deserializer=pb.ShardCommand.FromString,
        response_serializer=pb.ShardReport.SerializeToString)}
    train = {"Train": grpc.stream_stream_rpc_method_handler(
        shard.train, request_deserializer=parse_worker_message, response_serializer=serialize_message)}
    for name, handlers in ((CONTROL_SERVICE, control), (SERVICE_NAME, train)):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


SHARD_LISTENING = "ps-shard listening on {host}:{port}"


async def serve_shard(bind: str, security: Any = None, *, on_started: Any = None,
                      stop: asyncio.Event | None = None, exit_after_run: bool = False) -> None:
    """Serve one shard on `bind` until SIGTERM/SIGINT (or `stop`; or, with `exit_after_run`, until a coordinator
    whose run is over detaches): it waits for a coordinator to attach."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from ormo_ps.common.grpc_options import GRPC_OPTIONS
    from ormo_ps.common.security import ServerSecurity
    from ormo_ps.server.serving import add_port, check_port_free, graceful_exit

    security = security or ServerSecurity()
    check_port_free(bind)
    shard = ShardService(exit_after_run=exit_after_run)
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
                             interceptors=security.interceptors())
    add_shard_to_server(shard, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = add_port(server, bind, security)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    import click

    click.echo(SHARD_LISTENING.format(host=bind.rsplit(":", 1)[0], port=port))
    if on_started is not None:
        on_started(shard, port)
    async with graceful_exit(doing="stopping (the run's state is its coordinator's checkpoints)") as signalled:
        waits = [asyncio.create_task(signalled.wait()), asyncio.create_task(shard.done.wait())]
        if stop is not None:
            waits.append(asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            shard.close()  # its streams end by themselves (gRPC would cancel them, and log each)
            await asyncio.sleep(0.2)
            await server.stop(1.0)
