"""The worker: register with the server, then compute a gradient at each parameter it is sent.

It needs only the server's address and where its data is: the model, data set, batch size, weight decay
and its data-stream seed come in the server's Welcome (model and data set may also be given, by name or
import path: the worker declares its model's parameter layout in its Ready, and the server checks it). It
reconnects with backoff (keeping its worker id) when the stream breaks, and gives up when the server has
been unreachable for `server_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from ormo_ps.common.chunks import BufferPool
from ormo_ps.common.codec import decode
from ormo_ps.common.data import BatchStream, Dataset, load_dataset, resolve_dataset
from ormo_ps.common.gradients import GradientComputer
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.layout import layout_of, to_pb
from ormo_ps.common.models import FROM_CLIENT, FlatModel, build_model, resolve_model
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.security import ClientSecurity
from ormo_ps.common import wire_dtype as wire_dtypes
from ormo_ps.common.transport import Receiver, Sender, TransportError
from ormo_ps.common.wire import Received, train_call
from ormo_ps.worker.prom_metrics import WorkerMeters

logger = logging.getLogger(__name__)

# Statuses after which reconnecting cannot help, when they come before this worker did any work.
FATAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.UNIMPLEMENTED}
# A worker whose gradients the server keeps refusing as non-finite stops instead of looping.
MAX_NONFINITE_IN_A_ROW = 5


class WorkerError(Exception):
    """Why this worker stops without the run being done: the server's refusal (`code`, `details`), or the
    run itself diverged (`diverged`)."""

    def __init__(self, message: str, *, code: str | None = None, details: str = "", diverged: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.details = details
        self.diverged = diverged


def widened(params: torch.Tensor) -> torch.Tensor:
    """Parameters that came as the run's wire dtype (bfloat16, float16), as the model's float32 (exact)."""
    return params if params.dtype == torch.float32 else params.to(torch.float32)


def _waiting_for(code: grpc.StatusCode, details: str, opts: WorkerOptions) -> str:
    """Why a stream ended, in words, with the likely cause of a connection failure."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"all worker slots are taken ({details}); waiting for one to free up"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return "this worker's previous stream is still open on the server"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"server unreachable ({code.name}: {_connection_cause(details, opts)})"
    return f"the stream ended with {code.name}: {details}"


def _connection_cause(details: str, opts: WorkerOptions) -> str:
    """gRPC's connection error, with what it most likely means for TLS (a wrong CA, TLS on one side only)."""
    text = details.lower()
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return f"the server's TLS certificate is not signed by --tls-ca {opts.security.tls_ca} ({details})"
    tls = bool(opts.security.tls_ca)
    if tls and ("handshake" in text or "wrong_version_number" in text or "wrong version number" in text
                or "socket closed" in text):
        return f"the TLS handshake failed: does the server use TLS (--tls-cert)? ({details})"
    if not tls and ("socket closed" in text or "connection reset" in text or "handshake" in text):
        return f"the connection was closed at once: does the server expect TLS (then give --tls-ca)? ({details})"
    return details


@dataclass(frozen=True)
class WorkerOptions:
    server: str
    data_dir: str | None = None
    download: bool = False
    slowdown: float = 1.0
    name: str | None = None
    server_timeout: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    device: str = "cpu"
    security: ClientSecurity = ClientSecurity()
    model: str | None = None  # instead of the model the server names (by name or import path)
    dataset: str | None = None  # instead of the data set the server names

    def __post_init__(self) -> None:
        if not self.server or ":" not in self.server:
            raise ValueError(f"server must be HOST:PORT, got {self.server!r}")
        if self.model is not None:
            resolve_model(self.model)
        if self.dataset is not None:
            resolve_dataset(self.dataset)
        if not self.slowdown >= 1:
            raise ValueError(f"slowdown must be >= 1, got {self.slowdown}")
        if not self.server_timeout > 0:
            raise ValueError(f"server_timeout must be > 0, got {self.server_timeout}")


@dataclass
class WorkerResult:
    worker_id: int | None
    gradients_sent: int
    stop_reason: str


class Worker:
    def __init__(self, options: WorkerOptions, meters: WorkerMeters | None = None) -> None:
        self.options = options
        self.meters = meters  # its Prometheus metrics (ps-worker --metrics-port), or None
        self.worker_id: int | None = None
        self.gradients_sent = 0
        self._dataset: Dataset | None = None
        self._model: FlatModel | None = None
        self._computer: GradientComputer | None = None
        self._stream: BatchStream | None = None
        self._stop_detail = ""  # the server's words with its last Stop
        self._welcomed = False  # a Welcome was handled: this worker did some work
        self._parameters_received = False  # in the current session
        # Its tensors, chunked above the size the Welcome says (0: whole), as the run's wire dtype.
        self._sender = Sender(wire_dtype=torch.float32)
        self._w0: torch.Tensor | None = None  # initial parameters to send with the Ready (the run wants them)
        self._buffers = BufferPool(max_bytes=1 << 62)  # one receive buffer, used again
        self._gradient_sent_at: float | None = None  # when the last gradient went out (its round trip's start)
        self._channels: dict[str, grpc.aio.Channel] = {}  # a sharded server's shards', by address

    async def run(self) -> WorkerResult:
        """Train until the server says stop; reconnect (keeping the worker id) whenever a stream breaks, and
        give up when no stream has made progress for `server_timeout` seconds. Raises WorkerError for what
        reconnecting cannot mend (refused credentials, a diverged run)."""
        opts = self.options
        backoff = opts.backoff_initial
        waiting_since: float | None = None  # since when no stream has got a gradient through
        shutdown_seen = False
        nonfinite_in_a_row = 0
        sessions = 0
        async with opts.security.aio_channel(opts.server, GRPC_OPTIONS) as channel, contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._close_channels)
            train = train_call(channel)
            while True:
                if sessions and self.meters is not None:
                    self.meters.reconnects.inc()
                sessions += 1
                sent_before = self.gradients_sent
                try:
                    reason = await self._session(train)
                except grpc.aio.AioRpcError as e:
                    code, details = e.code(), e.details() or ""
                    if (code in FATAL and not self._welcomed) or (
                            code == grpc.StatusCode.FAILED_PRECONDITION and not self._parameters_received):
                        # Refused before doing any work (a configuration error), or at Register or Ready (a
                        # model that is not the run's): retrying cannot help.
                        raise WorkerError(f"the server at {opts.server} refused this worker: {code.name}: "
                                          f"{details}", code=code.name, details=details) from None
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
                        # gRPC's own refusal of a message above the server's receive limit, not a full run.
                        raise WorkerError(f"the server at {opts.server} refused a message of this worker as too "
                                          f"large ({details}): a client model's tensors must travel in chunks "
                                          "(accepts_chunks), or the server must run with a larger limit",
                                          code=code.name, details=details) from None
                    if code == grpc.StatusCode.ABORTED and "dropped" in details:
                        # This worker's own gradients were non-finite, again and again (server/faults.py): a bug,
                        # bad data or a broken device here. The run goes on without it; reconnecting cannot help.
                        raise WorkerError(f"the server dropped this worker: {details}", code=code.name,
                                          details=details) from None
                    if self.gradients_sent > sent_before + 1:  # gradients went through before this one
                        nonfinite_in_a_row = 0
                    if code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in details:
                        nonfinite_in_a_row += 1
                        if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                            raise WorkerError(f"{nonfinite_in_a_row} gradients in a row were refused as non-finite:"
                                              f" the run is diverging ({details})", diverged=True) from None
                    why = _waiting_for(code, details, opts)
                else:
                    if reason == "STOP_REASON_DIVERGED":
                        raise WorkerError(f"the server ended the run: {self._stop_detail}", diverged=True)
                    if reason != "STOP_REASON_SHUTDOWN":
                        return WorkerResult(self.worker_id, self.gradients_sent, reason)
                    shutdown_seen = True
                    why = "the server is shutting down; waiting for it to come back"
                if self.gradients_sent > sent_before:  # that stream worked: start waiting and backing off afresh
                    backoff = opts.backoff_initial
                    waiting_since = None
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - waiting_since > opts.server_timeout:
                    logger.warning("worker %s: giving up after %.0fs: %s", self._who(), opts.server_timeout, why)
                    reason = "STOP_REASON_SHUTDOWN" if shutdown_seen else "server gone"
                    return WorkerResult(self.worker_id, self.gradients_sent, reason)
                delay = backoff * (0.5 + random.random())
                logger.info("worker %s: %s; retrying %s in %.1fs", self._who(), why, opts.server, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, opts.backoff_max)

    async def _close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _who(self) -> str:
        return str(self.worker_id) if self.worker_id is not None else "(no id yet)"

    async def _session(self, train: Callable[..., grpc.aio.StreamStreamCall]) -> str:
        """One Train stream, from Register to Stop. Returns the stop reason."""
        opts = self.options
        # Not wait_for_ready: an unreachable server must fail fast so the retry loop can time it out.
        call = train(wait_for_ready=False, timeout=None, metadata=opts.security.call_metadata())
        finished = False
        self._parameters_received = False
        self._gradient_sent_at = None  # the first parameters of a stream answer no gradient
        # Chunked parameters being received, in one buffer used again: the parameters in it are loaded into the
        # model (copied) before the gradient goes out, and the next parameters come only after that.
        incoming = Receiver(self._buffers, announcement="Parameters")
        try:
            await _write(call, pb.WorkerMessage(register=self._register()))
            while True:
                received = await _read(call)
                if received is None:
                    return "stream closed"
                try:
                    received = incoming.take(received)
                except TransportError as e:
                    raise RuntimeError(f"the server broke the stream's rules: {e.message}") from None
                if received is None:  # a piece of chunked parameters
                    continue
                msg = received.message
                kind = msg.WhichOneof("payload")
                # Chunked parameters were put together in this worker's own buffer: no copy needed.
                owned = kind == "parameters" and msg.parameters.tensor.chunked
                if kind == "welcome":
                    self._sender.chunk_bytes = incoming.chunk_bytes = msg.welcome.chunk_bytes
                    self._sender.wire_dtype = wire_dtypes.from_pb(msg.welcome.config.wire_dtype)
                    ready = await asyncio.to_thread(self._on_welcome, msg.welcome)
                    self._welcomed = True
                    if self.meters is not None:
                        self.meters.worker_id.set(self.worker_id)
                    if msg.welcome.shards:  # a sharded server: the tensors go to and come from its shards
                        reason = await self._sharded(call, msg.welcome, self._ready_messages(ready))
                        finished = reason is not None
                        return reason or "stream closed"
                    for m in self._ready_messages(ready):
                        await _write(call, m)
                elif kind == "parameters":
                    self._parameters_received = True
                    if self.meters is not None and self._gradient_sent_at is not None:
                        self.meters.round_trip.observe(time.monotonic() - self._gradient_sent_at)
                    self._gradient_sent_at = None
                    params = self._decode_parameters(msg.parameters.tensor, received.tensor_data, owned)
                    for m in await self._gradient(params, msg.parameters.iteration_index):
                        await _write(call, m)
                    self._gradient_sent_at = time.monotonic()
                elif kind == "stop":
                    finished = True
                    self._stop_detail = msg.stop.detail
                    await call.done_writing()
                    return pb.StopReason.Name(msg.stop.reason)
        finally:
            if not finished:
                call.cancel()

    async def _sharded(self, call: grpc.aio.StreamStreamCall, welcome: pb.Welcome,
                       ready: list[pb.WorkerMessage | bytes]) -> str | None:
        """A session with a sharded server (Welcome.shards): a stream to each shard, the Ready to the coordinator,
        then each round the S slices of the parameters put together and the gradient's S slices sent, while the
        coordinator's stream is watched for its Stop (the reason returned) or its status (raised)."""
        links = [ShardStream(i, endpoint, self.options, self._shard_channel(endpoint.address))
                 for i, endpoint in enumerate(welcome.shards)]
        coordinator: asyncio.Task | None = None
        try:
            await asyncio.gather(*(link.open(welcome, self._register()) for link in links))
            for m in ready:
                await _write(call, m)
            coordinator = asyncio.create_task(self._coordinator_end(call))
            params = torch.empty(welcome.config.num_parameters, dtype=torch.float32, device=self.options.device)
            while True:
                parts = asyncio.ensure_future(asyncio.gather(*(link.read_parameters(params) for link in links)))
                await asyncio.wait({parts, coordinator}, return_when=asyncio.FIRST_COMPLETED)
                if coordinator.done():
                    parts.cancel()
                    with contextlib.suppress(BaseException):
                        await parts
                    return coordinator.result()  # (or its status, raised)
                indexes = {index for index, _ in parts.result()}
                if len(indexes) != 1:
                    raise RuntimeError(f"the shards sent parameters of different iterations {sorted(indexes)}")
                index = indexes.pop()
                self._parameters_received = True
                if self.meters is not None and self._gradient_sent_at is not None:
                    self.meters.round_trip.observe(time.monotonic() - self._gradient_sent_at)
                grad, loss, count = await self._shard_gradient(params, index)
                await asyncio.gather(*(link.send_gradient(grad, index, loss, count) for link in links))
                self._gradient_sent_at = time.monotonic()
        finally:
            if coordinator is not None and not coordinator.done():
                coordinator.cancel()
            for link in links:
                link.close()

    def _shard_channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a shard (`:PORT`: the host this worker reaches the server at), kept for later sessions."""
        if address.startswith(":"):
            address = self.options.server.rsplit(":", 1)[0] + address
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.options.security.aio_channel(address, GRPC_OPTIONS)
        return channel

    async def _coordinator_end(self, call: grpc.aio.StreamStreamCall) -> str:
        """The coordinator's stream after the Ready: its Stop's reason, or its status raised."""
        while True:
            received = await _read(call)
            if received is None:
                return "stream closed"
            msg = received.message
            if msg.WhichOneof("payload") == "stop":
                self._stop_detail = msg.stop.detail
                with contextlib.suppress(Exception):
                    await call.done_writing()
                return pb.StopReason.Name(msg.stop.reason)

    async def _shard_gradient(self, params: torch.Tensor, iteration_index: int) -> tuple[torch.Tensor, float, int]:
        """(gradient, loss, batch size) at `params` for a sharded server (cut into slices by the caller)."""
        started = time.monotonic()
        grad, loss, count = await asyncio.to_thread(self._compute_gradient, params)
        if self.options.slowdown > 1:
            await asyncio.sleep((self.options.slowdown - 1) * (time.monotonic() - started))
        self.gradients_sent += 1
        if self.meters is not None:
            self.meters.computed(time.monotonic() - started)
        return grad, loss, count

    def _compute_gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        x, y = next(self._stream)
        grad, loss = self._computer.compute(params, x, y)
        return grad, loss, len(y)

    def _decode_parameters(self, tensor: pb.Tensor, data: memoryview | None, owned: bool) -> torch.Tensor:
        """The parameters a Parameters message brought (its bytes: `data`, kept out of the message by the wire
        framing, or the chunks put back together in a buffer this worker `owned`), checked against its model."""
        if self._model is None:
            raise RuntimeError("parameters arrived before the Welcome")
        return widened(decode(tensor, expected_numel=self._model.numel, expected_dtype=self._sender.wire_dtype,
                              device=self.options.device, data=data, copy=not owned))

    def _ready_messages(self, ready: pb.Ready) -> list[pb.WorkerMessage | bytes]:
        """The messages that send `ready`, with the initial parameters `_on_welcome` set aside when the run
        wants them: chunked as the Welcome said (a run whose clients bring the model receives a chunk at most)."""
        w0, self._w0 = self._w0, None
        return [pb.WorkerMessage(ready=ready)] if w0 is None else self._sender.ready(ready, w0)

    def _register(self) -> pb.Register:
        """The first message of each session."""
        register = pb.Register(name=self.options.name or socket.gethostname(), slowdown=self.options.slowdown,
                               accepts_chunks=True)
        if self.worker_id is not None:
            register.requested_worker_id = self.worker_id
        return register

    def _on_welcome(self, welcome: pb.Welcome) -> pb.Ready:
        """Build the model and the data stream the Welcome describes (once); the Ready to answer it with."""
        cfg = welcome.config
        # A worker that asked for its old id may be given another (its old slot was taken meanwhile): the
        # mini-batch stream belongs to the id, so it starts afresh then.
        new_id = welcome.worker_id != self.worker_id
        if self.worker_id is not None and new_id:
            logger.info("worker %d: the server gave this worker id %d", self.worker_id, welcome.worker_id)
        self.worker_id = welcome.worker_id
        model = self.options.model or cfg.model
        if self._model is None:
            if model == FROM_CLIENT:
                raise RuntimeError(f"the server names no model (--model {FROM_CLIENT}: its clients bring their own); "
                                   "give this worker --model")
            self._dataset = load_dataset(self.options.dataset or cfg.dataset, self.options.data_dir,
                                         self.options.download)
            with torch.random.fork_rng(devices=[]):  # the run's w_0 (asked for when it names no model)
                torch.manual_seed(cfg.seed)
                module = build_model(model, self._dataset.num_classes, self._dataset.input_shape)
            self._model = FlatModel(module, device=self.options.device)
            # A server that sends a layout (or asks for one) checks it in the Ready; one of an earlier version
            # sends neither: check the size here.
            known = welcome.HasField("layout") or welcome.parameters_wanted
            if not known and self._model.numel != cfg.num_parameters:
                raise RuntimeError(f"model {model} has {self._model.numel} parameters here, "
                                   f"the server's has {cfg.num_parameters}")
            self._computer = GradientComputer(self._model, cfg.weight_decay)
        if self._stream is None or new_id:
            self._stream = BatchStream(self._dataset, cfg.batch_size, welcome.data_seed, self.options.device)
        logger.info("worker %d: %s on %s, %s, K=%d", self.worker_id, model, self._dataset.name, cfg.algorithm,
                    cfg.num_workers)
        # The run names no model: this worker's w_0 (drawn from the run's seed) may become the run's.
        self._w0 = self._model.params if welcome.parameters_wanted else None
        return pb.Ready(layout=to_pb(layout_of(self._model.module)))

    async def _gradient(self, params: torch.Tensor, iteration_index: int) -> list[bytes]:
        """The messages of the gradient at `params` (whole, or chunked as the Welcome said)."""
        started = time.monotonic()
        # Off the event loop: gRPC keeps reading and answering pings meanwhile.
        messages = await asyncio.to_thread(self._compute, params, iteration_index)
        if self.options.slowdown > 1:
            # A slow worker: its gradient takes `slowdown` times as long as this machine needs.
            await asyncio.sleep((self.options.slowdown - 1) * (time.monotonic() - started))
        self.gradients_sent += 1
        if self.meters is not None:
            self.meters.computed(time.monotonic() - started)
        return messages

    def _compute(self, params: torch.Tensor, iteration_index: int) -> list[bytes]:
        x, y = next(self._stream)
        grad, loss = self._computer.compute(params, x, y)
        return self._sender.gradient(grad, iteration_index, loss, len(y))


async def _read(call: grpc.aio.StreamStreamCall) -> Received | None:
    """The stream's next message; None when it ended with OK; its status raised when it ended with another."""
    received = await call.read()
    if received is grpc.aio.EOF:
        if await call.code() == grpc.StatusCode.OK:
            return None
        raise await _ended(call)
    return received


async def _ended(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """The error a stream that ended with a status stands for (to be raised)."""
    return grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(), await call.trailing_metadata(),
                                await call.details())


async def _write(call: grpc.aio.StreamStreamCall, message: pb.WorkerMessage | bytes) -> None:
    """Write to the stream; a stream that ended meanwhile (the server went away while this worker computed)
    raises its status as `AioRpcError`, like a read would, so the retry loop reconnects."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        raise await _ended(call) from None


class ShardStream:
    """A worker's Train stream to one shard of a sharded server: its slice [start, end) of the parameters in, of
    each gradient out (proto: Welcome.shards)."""

    def __init__(self, index: int, endpoint: pb.ShardEndpoint, options: WorkerOptions,
                 channel: grpc.aio.Channel) -> None:
        self.index = index
        self.start, self.end = endpoint.start, endpoint.end
        self.options = options
        self.call = train_call(channel)(wait_for_ready=False, timeout=None,
                                        metadata=options.security.call_metadata())
        self.sender = Sender(wire_dtype=torch.float32)
        self.incoming = Receiver(BufferPool(max_bytes=1 << 62), announcement="Parameters")

    async def open(self, welcome: pb.Welcome, register: pb.Register) -> None:
        register.requested_worker_id = welcome.worker_id
        register.session = welcome.session
        await _write(self.call, pb.WorkerMessage(register=register))
        msg = await self._next()
        if msg.message.WhichOneof("payload") != "welcome":
            raise RuntimeError(f"shard {self.index} answered the Register with "
                               f"{msg.message.WhichOneof('payload')}")
        shard_welcome = msg.message.welcome
        self.sender.chunk_bytes = self.incoming.chunk_bytes = shard_welcome.chunk_bytes
        self.sender.wire_dtype = wire_dtypes.from_pb(welcome.config.wire_dtype)
        if shard_welcome.config.num_parameters != self.end - self.start:
            raise RuntimeError(f"shard {self.index} holds {shard_welcome.config.num_parameters} parameters; the "
                               f"server said [{self.start}, {self.end})")

    async def _next(self) -> Received:
        """The next whole message (its chunks put together)."""
        while True:
            received = await self.call.read()
            if received is grpc.aio.EOF:
                code = await self.call.code()
                if code == grpc.StatusCode.OK:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), f"shard {self.index} closed its stream")
                raise await _ended(self.call)
            try:
                whole = self.incoming.take(received)
            except TransportError as e:
                raise RuntimeError(f"shard {self.index} broke the stream's rules: {e.message}") from None
            if whole is not None:
                return whole

    async def read_parameters(self, params: torch.Tensor) -> tuple[int, float]:
        """This shard's slice of the next parameters, into `params[start:end]`: (iteration index, epoch)."""
        received = await self._next()
        msg = received.message
        if msg.WhichOneof("payload") == "stop":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       f"shard {self.index} stopped: {msg.stop.detail}")
        if msg.WhichOneof("payload") != "parameters":
            raise RuntimeError(f"shard {self.index} sent {msg.WhichOneof('payload')} where parameters were due")
        part = decode(msg.parameters.tensor, expected_numel=self.end - self.start,
                      expected_dtype=self.sender.wire_dtype, data=received.tensor_data, copy=False)
        params[self.start:self.end].copy_(part)  # (widened to float32, exactly)
        return msg.parameters.iteration_index, msg.parameters.epoch

    async def send_gradient(self, grad: torch.Tensor, iteration_index: int, loss: float, count: int) -> None:
        for m in self.sender.gradient(grad[self.start:self.end], iteration_index, loss, count):
            await _write(self.call, m)

    def close(self) -> None:
        self.call.cancel()
