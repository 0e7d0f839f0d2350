"""One worker's Train stream on the server: its state (`Connection`) and its reader and writer (`WorkerStream`).

A stream's reader hands each message to its owner (the service) with no `await` in between, so what the owner
does is atomic on the event loop, and writes the answers to that message itself, right after it (no hand-over
to another task: measured ~7 % of a ResNet20 round trip). What others queue for the worker (a synchronous
round's end, the run's end) wakes the stream's writer. One writer at a time per stream, in queue order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from ormo_ps.common.log_limit import LimitedLog, shorten
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.common.wire import Received

# The stream is the service's own part: it logs as the service does.
logger = logging.getLogger("ormo_ps.server.service")

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
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)  # the stream's writer has messages to write
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by whoever writes the outbox
    reading: bool = False  # the stream's reader is handling one of its messages: it writes the answers itself
    ending: str | None = None  # "stop" once a Stop was written, "end" once END_STREAM was reached
    error: Rejected | None = None
    ready: bool = False
    new_slot: bool = False  # its id had never been given out before (undone if its Ready is refused)
    session: int = 0  # a sharded server's session of this worker (Welcome.session); 0 for one server
    # Its tensors on the stream (common/transport.py): parameters sent to it, chunked above the chunk size its
    # Welcome gave (0: whole; it did not ask for chunks, or the server sends none), and what it sends, received
    # in the service's buffers.
    sender: Sender = field(default_factory=Sender)
    incoming: Receiver = field(default_factory=Receiver)

    def send(self, message: object) -> None:
        """Queue a message (bytes, a ServerMessage, or END_STREAM) for this worker. The stream's reader writes
        the answers to a message it is handling right after (see the module's docstring), so it reads the
        worker's next message once the worker has taken its answer (a worker reads its parameters before it
        computes the next gradient); what others queue wakes the stream's writer."""
        self.outbox.append(message)
        if not self.reading:
            self.wakeup.set()


class StreamOwner(Protocol):
    """What a stream asks of the service it belongs to."""

    def on_message(self, conn: Connection, received: Received) -> None:
        """Handle one message (atomic: no await); Rejected ends the stream with its status."""

    def refusal_stop(self) -> pb.ServerMessage | None:
        """After a refusal: the Stop to send instead of the status when the refusal ended the run, else None."""

    def after_message(self) -> None:
        """After each message handled (the run may have ended with it)."""

    def count_malformed(self) -> None:
        """A message gRPC delivered but protobuf could not parse."""

    def disconnect(self, conn: Connection) -> None:
        """The worker is gone: free its slot (idempotent)."""


class WorkerStream:
    """The reader and writer of one admitted worker's Train stream (`run` returns once the stream is over)."""

    def __init__(self, conn: Connection, requests: AsyncIterator[Received], context: grpc.aio.ServicerContext,
                 owner: StreamOwner, rejections: LimitedLog) -> None:
        self.conn = conn
        self.requests = requests
        self.context = context
        self.owner = owner
        self.rejections = rejections

    async def run(self) -> None:
        conn = self.conn
        reader = asyncio.create_task(self._read(), name=f"reader-{conn.worker}")
        try:
            while conn.ending is None:
                await conn.wakeup.wait()
                conn.wakeup.clear()
                await self._write()
            if conn.ending == "stop":
                # Let the worker read the Stop and close its side; gradients still in flight are dropped.
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(reader), timeout=5.0)
            if conn.error is not None:
                # abort() sends the status at once: free the worker's slot first, so a worker that
                # reconnects as soon as it reads the status is not refused with ALREADY_EXISTS.
                self.owner.disconnect(conn)
                reader.cancel()
                await self.context.abort(conn.error.code, conn.error.message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.owner.disconnect(conn)

    async def _write(self) -> None:
        """Write the worker's outbox, in order (one writer at a time), up to END_STREAM or a Stop, which end the
        stream: the writer is woken to end it. A worker that went away ends it too (nothing to write to)."""
        conn = self.conn
        async with conn.writing:
            while conn.outbox and conn.ending is None:
                msg = conn.outbox.popleft()
                if msg is END_STREAM:
                    conn.ending = "end"
                    break
                try:
                    await self.context.write(msg)
                except (grpc.aio.InternalError, grpc.aio.UsageError) as e:  # the worker went away meanwhile
                    logger.debug("worker %d: stream gone while writing to it: %r", conn.worker, e)
                    conn.outbox.clear()
                    conn.ending = "end"
                    break
                if isinstance(msg, pb.ServerMessage) and msg.WhichOneof("payload") == "stop":
                    conn.ending = "stop"
        if conn.ending is not None:
            conn.wakeup.set()

    async def _read(self) -> None:
        conn, owner = self.conn, self.owner
        try:
            async for msg in self.requests:
                conn.reading = True  # the answers to this message are written below, by this task
                try:
                    owner.on_message(conn, msg)
                except Rejected as e:
                    conn.reading = False
                    self.rejections.warning("worker %d: %s (%s)", conn.worker, shorten(e.message, 300), e.code.name)
                    stop = owner.refusal_stop()
                    if stop is not None:  # this refusal ended the run: say so, not only refuse
                        conn.send(stop)
                        return
                    conn.error = e
                    conn.send(END_STREAM)
                    return
                finally:
                    conn.reading = False
                owner.after_message()
                if conn.outbox:
                    await self._write()
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, grpc.aio.AbortError):  # the worker went away, or its stream was ended
            pass
        except DecodeError as e:
            self.rejections.warning("worker %d: malformed message: %s", conn.worker, shorten(e, 200))
            owner.count_malformed()
            conn.error = Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}")
        except Exception:  # a bug must end this stream with a status, not leave it hanging
            logger.exception("worker %d: unexpected error handling a message", conn.worker)
            conn.error = Rejected(grpc.StatusCode.INTERNAL, "internal error in the parameter server")
        conn.send(END_STREAM)
