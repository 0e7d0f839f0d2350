"""A synthetic gradient pusher for bench/throughput: one raw Train stream, no model, no compute.

Registers, sends Ready, then loops: receive Parameters, at once send a Gradient of the announced size
(float32, small values, the iteration index it received), both whole or chunked as ps-worker does (it
says it reads chunks; the Welcome says above which size it sends them), until the orchestrator raises the
stop flag, `--max-round-trips` replies came back, or `--max-seconds` passed. It only stops right after a reply, so
a pusher that ends normally has nothing in flight. Live counters go to a shared control file (a small
int64 memmap, see the column names below) that the orchestrator reads at the edges of a measurement
window. While the orchestrator's pause flag is up, the pusher holds its parameters and polls the flag
every 0.2 s instead of sending: a paused group has nothing in flight and uses almost no CPU. (Pausing
with SIGSTOP does not work: a stopped peer's full TCP receive window trips gRPC's TCP_USER_TIMEOUT,
which the keepalive options set to 10 s, and the connection is dropped.)

Imports no torch: K of these start in seconds on two cores. Works against the real ps-server and against
bench/grpc_echo.py, which speaks the same protocol. Against a sharded ps-server (`--shards S`: the Welcome lists
the shards) it speaks the sharded protocol as ps-worker does (worker/client.py `Worker._sharded`): one more Train
stream to each shard (Register with the Welcome's worker id and session), the Ready to the coordinator, then each
round the S slices of the parameters in and the gradient's S slices out (`push_sharded`); the bytes of one
round's messages to and from each shard go to the SHARD_UP/SHARD_DOWN columns.

    python -m bench.grad_pusher --target 127.0.0.1:PORT --control FILE --slot I --slots K
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from bench import harness
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.chunks import BufferPool
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.common.wire import train_call


# Columns of a pusher's row in the control file (int64). Shared with bench/throughput.
STATE, SENT, REPLIES, UP_BYTES, DOWN_BYTES, ERROR, PID, NUMEL, PAUSED, REPLY_NS_A, REPLY_NS_B = range(11)
# Against a sharded server: the number of shards, and the bytes of one round's messages to / from shard i
# (SHARD_UP + i, SHARD_DOWN + i, for i < MAX_SHARDS); UP_BYTES / DOWN_BYTES are their sums.
SHARDS = 11
MAX_SHARDS = 8
SHARD_UP = 12
SHARD_DOWN = SHARD_UP + MAX_SHARDS
COLUMNS = SHARD_DOWN + MAX_SHARDS
# REPLY_NS_A/B: time.monotonic_ns() of the latest reply, written before and after REPLIES, so a reader
# that finds them equal knows the count and the time belong together (see `record_reply`).
# Control row (the last one): the orchestrator's stop and pause flags; torch-rpc's server writes its
# applied count and its pid (it is a forked rank, not a process the orchestrator started).
STOP, APPLIED, SERVER_PID, PAUSE = 0, 1, 2, 3
PAUSE_POLL = 0.2  # seconds between looks at the pause flag while paused
STARTING, READY, DONE, FAILED = 0, 1, 2, -1


def open_control(path: str | Path, slots: int) -> np.memmap:
    return np.memmap(path, dtype=np.int64, mode="r+", shape=(slots + 1, COLUMNS))


async def _stop_after_reply(row: np.ndarray, stop: np.ndarray, replies: int, max_round_trips: int,
                            deadline: float) -> bool:
    """After a reply: whether to stop (the flag, the count, the deadline); while the pause flag is up, hold
    (polling it every PAUSE_POLL s) and say so in the row."""
    if stop[STOP] or replies >= max_round_trips or time.monotonic() > deadline:
        return True
    if stop[PAUSE]:
        row[PAUSED] = 1
        while stop[PAUSE] and not stop[STOP] and time.monotonic() < deadline:
            await asyncio.sleep(PAUSE_POLL)
        row[PAUSED] = 0
        return bool(stop[STOP]) or time.monotonic() > deadline
    return False


def record_reply(row: np.ndarray, replies: int) -> None:
    now = time.monotonic_ns()
    row[REPLY_NS_A] = now
    row[REPLIES] = replies
    row[REPLY_NS_B] = now


def on_wire(g: np.ndarray, wire_dtype: int) -> np.ndarray | tuple[int, np.ndarray]:
    """A float32 gradient as the run's wire dtype says (the Welcome's), in that dtype's wire layout, without torch:
    bfloat16 as the upper 16 bits rounded to nearest even (torch's cast), float16 by numpy."""
    if wire_dtype in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32):
        return g
    if wire_dtype == pb.DTYPE_FLOAT16:
        return pb.DTYPE_FLOAT16, g.astype("<f2")
    bits = g.view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # (no NaN here: small finite values)
    return pb.DTYPE_BFLOAT16, rounded.astype("<u2").view("<i2")


def gradient_bytes(numel: int, seed: int) -> bytes:
    """Small float32 values (|g| ~ 1e-4), little-endian: a plausible gradient that never overflows."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(numel, dtype=np.float32) * np.float32(1e-4)).astype("<f4").tobytes()


async def push(target: str, control: np.memmap, slot: int, max_round_trips: int, max_seconds: float) -> int:
    row = control[slot]
    stop = control[-1]
    deadline = time.monotonic() + max_seconds
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        # The call's deadline bounds every read, also if the other side hangs.
        call = train_call(channel)(timeout=max_seconds + 30.0)
        try:
            # As ps-worker: it reads chunked parameters, and sends its gradients as the Welcome says.
            await call.write(pb.WorkerMessage(register=pb.Register(name=f"pusher-{slot}", accepts_chunks=True)))
            first = await call.read()
            if first is grpc.aio.EOF or first.message.WhichOneof("payload") != "welcome":
                raise RuntimeError(f"expected a Welcome, got {first!r}")
            welcome = first.message.welcome
            if welcome.shards:
                return await push_sharded(channel, call, welcome, target, row, stop, slot, max_round_trips,
                                          deadline)
            numel, chunk_bytes = welcome.config.num_parameters, welcome.chunk_bytes
            row[NUMEL] = numel
            gradient = on_wire(np.frombuffer(gradient_bytes(numel, slot), dtype="<f4"), welcome.config.wire_dtype)
            sender = Sender(chunk_bytes)
            row[UP_BYTES] = sum(map(len, sender.gradient(gradient, 0, 0.0, 128)))
            await call.write(pb.WorkerMessage(ready=pb.Ready()))
            row[STATE] = READY
            replies = -1  # the first Parameters answers Ready, not a gradient
            # One receive buffer, used again, as ps-worker's; float32 parameters (the pushers import no torch).
            wire = welcome.config.wire_dtype or pb.DTYPE_FLOAT32
            incoming = Receiver(BufferPool(max_bytes=1 << 62), chunk_bytes, announcement="Parameters",
                                expect=lambda name, message: (None, wire))
            while True:
                got = await _parameters(call, incoming)
                if got is None:
                    break
                iteration_index, nbytes = got
                replies += 1
                if replies == 0:
                    row[DOWN_BYTES] = nbytes
                record_reply(row, replies)
                if await _stop_after_reply(row, stop, replies, max_round_trips, deadline):
                    break
                # Built afresh each time, as a worker builds each gradient's messages (one copy of the tensor).
                for message in sender.gradient(gradient, iteration_index, 0.0, 128):
                    await call.write(message)
                row[SENT] += 1
            await call.done_writing()
            row[STATE] = DONE
            return 0
        finally:
            call.cancel()


class _Shard:
    """The pusher's Train stream to one shard: its slice [start, end) of the gradient, its Sender and Receiver."""

    def __init__(self, channel: grpc.aio.Channel, endpoint: pb.ShardEndpoint, timeout: float) -> None:
        self.channel = channel
        self.start, self.end = endpoint.start, endpoint.end
        self.call = train_call(channel)(timeout=timeout)
        self.sender: Sender | None = None
        self.incoming: Receiver | None = None

    async def open(self, welcome: pb.Welcome, slot: int) -> int:
        """Register with the coordinator's worker id and session; the shard's Welcome: its chunk size."""
        await self.call.write(pb.WorkerMessage(register=pb.Register(
            name=f"pusher-{slot}", requested_worker_id=welcome.worker_id, session=welcome.session,
            accepts_chunks=True)))
        answer = await self.call.read()
        if answer is grpc.aio.EOF or answer.message.WhichOneof("payload") != "welcome":
            raise RuntimeError(f"shard [{self.start}, {self.end}) answered the Register with {answer!r}")
        shard_welcome = answer.message.welcome
        if shard_welcome.config.num_parameters != self.end - self.start:
            raise RuntimeError(f"shard [{self.start}, {self.end}) holds {shard_welcome.config.num_parameters} "
                               "parameters")
        wire = welcome.config.wire_dtype or pb.DTYPE_FLOAT32
        self.sender = Sender(shard_welcome.chunk_bytes)
        self.incoming = Receiver(BufferPool(max_bytes=1 << 62), shard_welcome.chunk_bytes, announcement="Parameters",
                                 expect=lambda name, message: (None, wire))
        return shard_welcome.chunk_bytes

    async def send(self, gradient: np.ndarray | tuple[int, np.ndarray], iteration_index: int) -> None:
        for message in self.sender.gradient(_slice(gradient, self.start, self.end), iteration_index, 0.0, 128):
            await self.call.write(message)


def _slice(gradient: np.ndarray | tuple[int, np.ndarray], start: int, end: int) -> np.ndarray | tuple[int, np.ndarray]:
    """[start, end) of a gradient as `on_wire` gives it (a view: the messages copy it once, as for one server)."""
    if isinstance(gradient, tuple):
        return gradient[0], gradient[1][start:end]
    return gradient[start:end]


async def push_sharded(channel: grpc.aio.Channel, call: grpc.aio.StreamStreamCall, welcome: pb.Welcome, target: str,
                       row: np.ndarray, stop: np.ndarray, slot: int, max_round_trips: int, deadline: float) -> int:
    """`push` against a sharded server (Welcome.shards), as ps-worker's `Worker._sharded`: a stream to each shard,
    the Ready to the coordinator, then each round every shard's slice of the parameters read (the same iteration
    index from all), and the gradient's slices sent, one to each shard, while the coordinator's stream is watched
    (a Stop or its end ends the pusher). Stops only right after a whole round's parameters came back."""
    if len(welcome.shards) > MAX_SHARDS:
        raise RuntimeError(f"{len(welcome.shards)} shards: the control file has columns for {MAX_SHARDS}")
    host = target.rsplit(":", 1)[0]
    numel = welcome.config.num_parameters
    row[NUMEL] = numel
    row[SHARDS] = len(welcome.shards)
    gradient = on_wire(np.frombuffer(gradient_bytes(numel, slot), dtype="<f4"), welcome.config.wire_dtype)
    channels: dict[str, grpc.aio.Channel] = {}
    timeout = deadline - time.monotonic() + 30.0
    shards = []
    for endpoint in welcome.shards:
        address = host + endpoint.address if endpoint.address.startswith(":") else endpoint.address
        if not address.startswith("127.0.0.1:"):
            raise RuntimeError(f"shard address {address}: the benchmark talks to 127.0.0.1 only")
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        shards.append(_Shard(channels[address], endpoint, timeout))
    coordinator: asyncio.Task | None = None
    try:
        await asyncio.gather(*(shard.open(welcome, slot) for shard in shards))
        for i, shard in enumerate(shards):
            row[SHARD_UP + i] = sum(map(len, shard.sender.gradient(_slice(gradient, shard.start, shard.end), 0, 0.0,
                                                                   128)))
        row[UP_BYTES] = int(row[SHARD_UP:SHARD_UP + len(shards)].sum())
        await call.write(pb.WorkerMessage(ready=pb.Ready()))
        row[STATE] = READY
        coordinator = asyncio.create_task(_coordinator_end(call))
        replies = -1  # the first Parameters answers Ready, not a gradient
        while True:
            parts = asyncio.ensure_future(asyncio.gather(*(_parameters(s.call, s.incoming) for s in shards)))
            await asyncio.wait({parts, coordinator}, return_when=asyncio.FIRST_COMPLETED)
            if coordinator.done():
                parts.cancel()
                with contextlib.suppress(BaseException):
                    await parts
                coordinator.result()  # (its error, raised)
                break
            got = parts.result()
            if any(g is None for g in got):
                break
            indexes = {index for index, _ in got}
            if len(indexes) != 1:
                raise RuntimeError(f"the shards sent parameters of different iterations {sorted(indexes)}")
            iteration_index = indexes.pop()
            replies += 1
            if replies == 0:
                for i, (_, nbytes) in enumerate(got):
                    row[SHARD_DOWN + i] = nbytes
                row[DOWN_BYTES] = sum(nbytes for _, nbytes in got)
            record_reply(row, replies)
            if await _stop_after_reply(row, stop, replies, max_round_trips, deadline):
                break
            await asyncio.gather(*(shard.send(gradient, iteration_index) for shard in shards))
            row[SENT] += 1
        for shard in shards:
            with contextlib.suppress(Exception):
                await shard.call.done_writing()
        with contextlib.suppress(Exception):
            await call.done_writing()
        row[STATE] = DONE
        return 0
    finally:
        if coordinator is not None and not coordinator.done():
            coordinator.cancel()
        for shard in shards:
            shard.call.cancel()
        for ch in channels.values():
            await ch.close()


async def _coordinator_end(call: grpc.aio.StreamStreamCall) -> None:
    """The coordinator's stream after the Ready: returns at its Stop or its end (raises an error status)."""
    while True:
        received = await call.read()
        if received is grpc.aio.EOF:
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise RuntimeError(f"the coordinator ended the stream: {code.name} {await call.details()}")
            return
        if received.message.WhichOneof("payload") == "stop":
            return


async def _parameters(call: grpc.aio.StreamStreamCall, incoming: Receiver) -> tuple[int, int] | None:
    """Read the next Parameters, whole or chunked (its bytes put together as a worker does); its iteration index
    and the bytes of its messages. None at the end of the stream (or a Stop)."""
    nbytes = 0
    while True:
        received = await call.read()
        if received is grpc.aio.EOF:
            return None
        nbytes += received.message.ByteSize() + (len(received.tensor_data) if received.tensor_data is not None
                                                 else 0)
        whole = incoming.take(received)
        if whole is not None:
            break
    msg = whole.message
    kind = msg.WhichOneof("payload")
    if kind == "stop":
        return None
    if kind != "parameters":
        raise RuntimeError(f"unexpected {kind} on the Train stream")
    return msg.parameters.iteration_index, nbytes


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("grad_pusher", __doc__)
    p.add_argument("--target", required=True, help="HOST:PORT of the server (127.0.0.1 only)")
    p.add_argument("--control", required=True, help="control file made by bench/throughput")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--slots", type=int, required=True, help="number of pusher rows in the control file")
    p.add_argument("--max-round-trips", type=int, default=10**9)
    p.add_argument("--max-seconds", type=float, default=600.0)
    args = p.parse_args(argv)
    tune_malloc()  # as ps-worker does
    if not args.target.startswith("127.0.0.1:"):
        p.error("the benchmark talks to 127.0.0.1 only")
    control = open_control(args.control, args.slots)
    control[args.slot, PID] = os.getpid()
    try:
        return asyncio.run(push(args.target, control, args.slot, args.max_round_trips, args.max_seconds))
    except BaseException as e:  # noqa: BLE001 - recorded for the orchestrator, then re-raised
        control[args.slot, STATE] = FAILED
        control[args.slot, ERROR] = 1
        print(f"pusher {args.slot}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        control.flush()


if __name__ == "__main__":
    sys.exit(main())
