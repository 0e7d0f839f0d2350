"""Who joins a run, and with what: the streams that have not registered yet (at most `max_pending`, each for at
most `first_message_timeout` seconds), a worker's Register (its slot), its declared parameter layout, the
initial parameters a client may bring, and its Ready (the run starts, or the worker rejoins it).

`Admission` owns the run's slots (`connections`, `ever_assigned`), its parameter layout and whether it has
started; the service (server/service.py) gives it the core, the run's configuration as workers see it, and a
way to send parameters (`route`), and asks it about the lifecycle (`ended`, `stop_message`). Each step runs on
the event loop and either completes or raises `Rejected` having changed nothing. The run's parameter layout
is its model's, or (a run whose clients bring the model, `--model client`) the first client's; every client
that declares one is checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc
import torch
from google.protobuf.message import DecodeError

from ormo_ps.common import layout as layouts
from ormo_ps.common.chunks import BufferPool
from ormo_ps.common.codec import CodecError, decode, dtype_to_pb
from ormo_ps.common.layout import Layout
from ormo_ps.common.log_limit import LimitedLog, shorten
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.tensor_checks import check_finite
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.common.wire_dtype import Scratch
from ormo_ps.common.wire import Received
from ormo_ps.server.core import Dispatch
from ormo_ps.server.stream import END_STREAM, Connection, Rejected

if TYPE_CHECKING:
    from ormo_ps.server.core import ServerCore

# Admission is the service's own part: it logs as the service does.
logger = logging.getLogger("ormo_ps.server.service")


class Admission:
    """The run's slots, layout and start (see the module's docstring)."""

    def __init__(self, core: ServerCore, *, layout: Layout | None, pb_run_config: Callable[[], pb.RunConfig],
                 route: Callable[[list[Dispatch]], None], ended: Callable[[], bool],
                 stop_message: Callable[[], pb.ServerMessage], buffers: BufferPool, chunk_bytes: int,
                 wait_for_all_workers: bool = True, ready_timeout: float = 120.0,
                 first_message_timeout: float = 30.0, max_pending: int = 16,
                 on_welcome: Callable[[Connection, pb.Welcome], None] | None = None) -> None:
        self.core = core
        self.on_welcome = on_welcome  # adds to each Welcome (a sharded server's shards and session)
        self.run = core.run
        self.layout = layout  # the run's parameter layout: its model's, or (a run that names none) the first client's
        self.pb_run_config = pb_run_config
        self.route = route
        self.ended = ended
        self.stop_message = stop_message
        self.buffers = buffers  # for chunked tensors, every stream's
        self.scratch = Scratch()  # for the parameters rounded to the wire dtype (one dispatch at a time)
        if chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes  # tensors larger than this travel chunked to and from clients that read them
        self.wait_for_all_workers = wait_for_all_workers
        self.ready_timeout = ready_timeout
        self.first_message_timeout = first_message_timeout  # a new stream's Register must come this soon
        self.max_pending = max_pending  # streams open at once that have not registered yet
        self.pending = 0
        self.connections: dict[int, Connection] = {}
        self.ever_assigned: set[int] = set()
        self.worker_slowdowns: dict[int, float] = {}  # what each worker said of itself when it registered
        self.started = core.started
        self._refusals = LimitedLog(logger, "refused workers and malformed first messages")

    async def open(self, requests: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> Connection | None:
        """A new Train stream: its first message, within the deadline and the limit on streams not registered
        yet, admits it (its Connection, welcomed), or the stream is answered here and None returned."""
        # Until it registers, a stream is anyone's: at most `max_pending` of them at once, each for at most
        # `first_message_timeout` seconds (what gRPC holds of its first message is bounded by the receive limit).
        if self.pending >= self.max_pending:
            self._refusals.warning("refused a stream from %s: %d streams have not registered yet",
                                   shorten(context.peer()), self.pending)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.pending} Train streams have not registered yet (at most {self.max_pending} "
                                "at once); try again")
            return None
        self.pending += 1
        try:
            first = (await asyncio.wait_for(anext(aiter(requests)), self.first_message_timeout)).message
        except StopAsyncIteration:
            return None
        except TimeoutError:
            self._refusals.warning("no Register from %s within %gs: stream closed", shorten(context.peer()),
                                   self.first_message_timeout)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Register within {self.first_message_timeout:g}s of opening the stream")
            return None
        except DecodeError as e:
            self._refusals.warning("malformed first message from %s: %s", shorten(context.peer()), shorten(e, 200))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}")
            return None
        finally:
            self.pending -= 1
        if self.ended():
            with contextlib.suppress(grpc.aio.InternalError, grpc.aio.UsageError):  # (already gone)
                await context.write(self.stop_message())
            return None
        try:
            return self.admit(first, context.peer())
        except Rejected as e:
            self._refusals.warning("refused a worker from %s: %s", shorten(context.peer()), shorten(e.message, 200))
            await context.abort(e.code, e.message)
            return None

    def not_ready(self, conn: Connection) -> None:
        """A registered worker that has not said Ready in time gives its slot back (a stream that registers
        and then does nothing would hold it for ever, and a full run would refuse real workers)."""
        if conn.ready or conn.error is not None:
            return
        logger.warning("worker %d (%s) sent no Ready within %.0fs: its slot is freed", conn.worker, conn.name,
                       self.ready_timeout)
        conn.error = Rejected(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no Ready within {self.ready_timeout:g}s of the Welcome; the slot was given back")
        conn.send(END_STREAM)

    def admit(self, first: pb.WorkerMessage, peer: str) -> Connection:
        """Register a worker: assign its id and welcome it. Atomic on the loop."""
        if first.WhichOneof("payload") != "register":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message on a Train stream must be Register")
        reg = first.register
        k = self.core.num_workers
        free = [w for w in range(k) if w not in self.connections]
        never = [w for w in free if w not in self.ever_assigned]
        if reg.HasField("requested_worker_id"):
            worker = reg.requested_worker_id
            if not 0 <= worker < k:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"requested worker id {worker} is out of range 0..{k - 1}")
            if worker in self.connections:
                # Its slot was taken meanwhile (a restarted worker with no id took it first, or this worker's
                # own old stream is not closed yet): another free slot serves as well.
                if not free:
                    raise Rejected(grpc.StatusCode.ALREADY_EXISTS,
                                   f"worker {worker} already has an open Train stream")
                logger.info("worker id %d is taken; giving the worker that asked for it id %d", worker,
                            (never or free)[0])
                worker = (never or free)[0]
        else:
            if not free:
                raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {k} worker slots are taken")
            worker = (never or free)[0]
        if not reg.slowdown >= 0:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"slowdown must be >= 0, got {reg.slowdown}")
        declared = self.check_layout(reg.layout) if reg.HasField("layout") else None  # the last refusal
        if declared is not None:
            self.adopt_layout(declared, shorten(reg.name or peer, 64))
        chunk_bytes = self.chunk_bytes if reg.accepts_chunks else 0
        conn = Connection(worker, shorten(reg.name or peer, 64), reg.slowdown or 1.0,
                          new_slot=worker not in self.ever_assigned,
                          sender=Sender(chunk_bytes, wire_dtype=self.run.wire_torch_dtype, scratch=self.scratch))
        conn.incoming = Receiver(self.buffers, chunk_bytes, why_whole=(
            "the server sends and reads every tensor whole (--chunk-mib 0)" if self.chunk_bytes == 0
            else "the client's Register did not set accepts_chunks"),
            expect=lambda name, message: self.expected_tensor(conn, name, message))
        self.connections[worker] = conn
        self.worker_slowdowns[worker] = conn.slowdown
        self.ever_assigned.add(worker)
        logger.info("worker %d registered (%s, slowdown %.2f), %d/%d connected", worker, conn.name,
                    conn.slowdown, len(self.connections), k)
        welcome = pb.Welcome(worker_id=worker, config=self.pb_run_config(), data_seed=self.run.worker_seed(worker),
                             parameters_wanted=not self.core.has_parameters, chunk_bytes=conn.sender.chunk_bytes)
        if self.layout is not None:
            welcome.layout.CopyFrom(layouts.to_pb(self.layout))
        if self.on_welcome is not None:
            self.on_welcome(conn, welcome)
        conn.send(pb.ServerMessage(welcome=welcome))
        return conn

    def check_layout(self, message: pb.ParameterLayout) -> Layout | None:
        """A client's declared layout against the run's: Rejected (FAILED_PRECONDITION) on a mismatch. Returns
        the layout when the run has none yet (to be adopted once nothing else can refuse). Changes nothing."""
        try:
            declared = layouts.from_pb(message)
        except ValueError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"bad parameter layout: {e}") from None
        if not declared:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the parameter layout lists no tensors")
        if self.layout is not None:
            problem = layouts.mismatch(self.layout, declared)
            if problem is None:
                return None
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the client's model does not match the run's parameter layout (model {self.run.model_name}: "
                           f"{len(self.layout)} tensors, {layouts.numel(self.layout)} values): {problem}")
        wrong = [spec for spec in declared if spec.dtype != torch.float32]
        if wrong:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the server holds float32 parameters; {wrong[0].describe()} is not float32")
        return declared

    def adopt_layout(self, declared: Layout, client: str) -> None:
        self.layout = declared
        logger.info("the run's parameter layout comes from client %s: %d tensors, %d values", client,
                    len(declared), layouts.numel(declared))

    def initial_numel(self, conn: Connection, ready: pb.Ready) -> int:
        """How many initial parameters a Ready announces in chunks may have: its layout's (checked now, before
        the bytes come) or the run's. Changes nothing (a refusal frees a new slot's id as `_on_ready` does)."""
        try:
            declared = self.check_layout(ready.layout) if ready.HasField("layout") else None
            known = declared or self.layout
            if known is None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "initial parameters need a parameter layout")
        except Rejected:
            if conn.new_slot:
                self.ever_assigned.discard(conn.worker)
            raise
        return layouts.numel(known)

    def initial_params(self, ready: pb.Ready, declared: Layout | None,
                        data: memoryview | None = None) -> torch.Tensor | None:
        """The initial parameters a Ready carries (their bytes in `data` when they came in chunks), checked, when
        the run still needs them. Changes nothing."""
        if not ready.HasField("parameters") or self.core.has_parameters:
            return None
        known = declared or self.layout
        if known is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "initial parameters need a parameter layout")
        try:
            params = decode(ready.parameters, expected_numel=layouts.numel(known), expected_dtype=torch.float32,
                            data=data)
            check_finite(params, "initial parameters")
        except CodecError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"bad initial parameters: {e}") from None
        return params

    def on_ready(self, conn: Connection, ready_msg: pb.Ready, data: memoryview | None = None) -> None:
        """The worker can compute: check what it declares, count it in the run and hand it parameters (`data`:
        the bytes of its initial parameters, when they came in chunks)."""
        try:
            declared = self.check_layout(ready_msg.layout) if ready_msg.HasField("layout") else None
            params0 = self.initial_params(ready_msg, declared, data)
        except Rejected:
            if conn.new_slot:
                self.ever_assigned.discard(conn.worker)
            raise
        if declared is not None:
            self.adopt_layout(declared, conn.name)
        if params0 is not None:
            self.core.set_initial_params(params0)
            logger.info("w_0 (%d values) comes from worker %d (%s)", params0.numel(), conn.worker, conn.name)
        conn.ready = True
        k = self.core.num_workers
        if not self.started:
            ready = sorted(w for w, c in self.connections.items() if c.ready)
            if self.wait_for_all_workers and len(ready) < k:
                logger.info("%d/%d workers ready", len(ready), k)
                return
            if not self.core.has_parameters:
                logger.info("%d workers ready; waiting for one that sends the initial parameters", len(ready))
                return
            self.started = True
            self.route([self.core.start_with(ready)])  # with --start-at-once, those not here yet join when they come
            logger.info("run started with %d workers", len(ready))
        else:
            dispatch = self.core.rejoin(conn.worker)
            if dispatch is not None:
                self.route([dispatch])

    def expected_tensor(self, conn: Connection, name: str, message: pb.WorkerMessage) -> tuple[int, int]:
        """What a chunked tensor on `conn` must be (numel, pb dtype), checked on its header before its bytes
        come: a gradient is the run's parameters' size; a client model's initial parameters its layout's."""
        if name == "gradient":
            return self.core.numel, dtype_to_pb(self.run.wire_torch_dtype)
        return self.initial_numel(conn, message.ready), pb.DTYPE_FLOAT32
