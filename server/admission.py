"""Who joins a run, and with what: a worker's Register (its slot), its declared parameter layout, the
initial parameters a client may bring, and its Ready (the run starts, or the worker rejoins it).

`Admission` holds these steps of `ParameterServerService` (server/service.py), which inherits them: they
read and change the service's state (its connections, slots, layout and core) on the event loop, and each
either completes or raises `Rejected` having changed nothing. The run's parameter layout is its model's,
or (a run whose clients bring the model, `--model client`) the first client's; every client that declares
one is checked against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from common import layout as layouts
from common.chunks import BufferPool
from common.transport import Receiver, Sender
from common.codec import CodecError, decode
from common.tensor_checks import check_finite
from common.layout import Layout
from common.log_limit import shorten
from common.pb import parameter_server_pb2 as pb
from server.core import Dispatch

if TYPE_CHECKING:
    from server.config import RunConfig
    from server.core import ServerCore

# These are the service's own steps: they log as the service does.
logger = logging.getLogger("server.service")

END_STREAM = object()  # outbox sentinel: close the stream normally


class Rejected(Exception):
    """A message that ends its stream with a gRPC status; the server's state is unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Connection:
    """One worker's Train stream: who it is, and what is to be sent to it (`send`)."""

    worker: int
    name: str
    slowdown: float
    outbox: deque = field(default_factory=deque)  # messages to write, in order; END_STREAM closes the stream
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)  # the stream's handler has messages to write
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by whoever writes the outbox
    reading: bool = False  # the stream's reader is handling one of its messages: it writes the answers itself
    ending: str | None = None  # "stop" once a Stop was written, "end" once END_STREAM was reached
    error: Rejected | None = None
    ready: bool = False
    new_slot: bool = False  # its id had never been given out before (undone if its Ready is refused)
    # Its tensors on the stream (common/transport.py): parameters sent to it, chunked above the chunk size its
    # Welcome gave (0: whole; it did not ask for chunks, or the server sends none), and what it sends, received
    # in the service's buffers.
    sender: Sender = field(default_factory=Sender)
    incoming: Receiver = field(default_factory=Receiver)

    def send(self, message: object) -> None:
        """Queue a message (bytes, a ServerMessage, or END_STREAM) for this worker. The stream's reader writes
        the answers to a message it is handling right after (no hand-over to another task on the way), so it
        reads the worker's next message once the worker has taken its answer (a worker reads its parameters
        before it computes the next gradient); what others queue (another worker's push, the run's end) wakes
        the stream's handler to write it."""
        self.outbox.append(message)
        if not self.reading:
            self.wakeup.set()


class Admission:
    """The service's admission steps (a mixin of `ParameterServerService`: the attributes below are its, and so
    are `pb_run_config()` and `_route()`, which these steps call)."""

    core: ServerCore
    run: RunConfig
    layout: Layout | None
    connections: dict[int, Connection]
    ever_assigned: set[int]
    worker_slowdowns: dict[int, float]
    started: bool
    wait_for_all_workers: bool
    ready_timeout: float
    chunk_bytes: int
    _buffers: BufferPool

    def _not_ready(self, conn: Connection) -> None:
        """A registered worker that has not said Ready in time gives its slot back (a stream that registers
        and then does nothing would hold it for ever, and a full run would refuse real workers)."""
        if conn.ready or conn.error is not None:
            return
        logger.warning("worker %d (%s) sent no Ready within %.0fs: its slot is freed", conn.worker, conn.name,
                       self.ready_timeout)
        conn.error = Rejected(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no Ready within {self.ready_timeout:g}s of the Welcome; the slot was given back")
        conn.send(END_STREAM)

    def _admit(self, first: pb.WorkerMessage, peer: str) -> Connection:
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
        declared = self._check_layout(reg.layout) if reg.HasField("layout") else None  # the last refusal
        if declared is not None:
            self._adopt_layout(declared, shorten(reg.name or peer, 64))
        chunk_bytes = self.chunk_bytes if reg.accepts_chunks else 0
        conn = Connection(worker, shorten(reg.name or peer, 64), reg.slowdown or 1.0,
                          new_slot=worker not in self.ever_assigned, sender=Sender(chunk_bytes))
        conn.incoming = Receiver(self._buffers, chunk_bytes, why_whole=(
            "the server sends and reads every tensor whole (--chunk-mib 0)" if self.chunk_bytes == 0
            else "the client's Register did not set accepts_chunks"),
            expect=lambda name, message: self._expected_tensor(conn, name, message))
        self.connections[worker] = conn
        self.worker_slowdowns[worker] = conn.slowdown
        self.ever_assigned.add(worker)
        logger.info("worker %d registered (%s, slowdown %.2f), %d/%d connected", worker, conn.name,
                    conn.slowdown, len(self.connections), k)
        welcome = pb.Welcome(worker_id=worker, config=self.pb_run_config(), data_seed=self.run.worker_seed(worker),
                             parameters_wanted=not self.core.has_parameters, chunk_bytes=conn.sender.chunk_bytes)
        if self.layout is not None:
            welcome.layout.CopyFrom(layouts.to_pb(self.layout))
        conn.send(pb.ServerMessage(welcome=welcome))
        return conn

    def _check_layout(self, message: pb.ParameterLayout) -> Layout | None:
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

    def _adopt_layout(self, declared: Layout, client: str) -> None:
        self.layout = declared
        logger.info("the run's parameter layout comes from client %s: %d tensors, %d values", client,
                    len(declared), layouts.numel(declared))

    def _initial_numel(self, conn: Connection, ready: pb.Ready) -> int:
        """How many initial parameters a Ready announces in chunks may have: its layout's (checked now, before
        the bytes come) or the run's. Changes nothing (a refusal frees a new slot's id as `_on_ready` does)."""
        try:
            declared = self._check_layout(ready.layout) if ready.HasField("layout") else None
            known = declared or self.layout
            if known is None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "initial parameters need a parameter layout")
        except Rejected:
            if conn.new_slot:
                self.ever_assigned.discard(conn.worker)
            raise
        return layouts.numel(known)

    def _initial_params(self, ready: pb.Ready, declared: Layout | None,
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

    def _on_ready(self, conn: Connection, ready_msg: pb.Ready, data: memoryview | None = None) -> None:
        """The worker can compute: check what it declares, count it in the run and hand it parameters (`data`:
        the bytes of its initial parameters, when they came in chunks)."""
        try:
            declared = self._check_layout(ready_msg.layout) if ready_msg.HasField("layout") else None
            params0 = self._initial_params(ready_msg, declared, data)
        except Rejected:
            if conn.new_slot:
                self.ever_assigned.discard(conn.worker)
            raise
        if declared is not None:
            self._adopt_layout(declared, conn.name)
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
            dispatch = self.core.start()
            for w in range(k):  # with --start-at-once, those not here yet join when they come
                if w not in ready:
                    self.core.deactivate(w)
            self._route([Dispatch(tuple(ready), dispatch.params, dispatch.iteration_index)])
            logger.info("run started with %d workers", len(ready))
        else:
            dispatch = self.core.rejoin(conn.worker)
            if dispatch is not None:
                self._route([dispatch])
