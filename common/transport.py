"""Tensors on the Train stream: one object sends them (`Sender`), one receives them (`Receiver`), on every side.

A stream's tensors (a worker's gradients and, for a model it brings, its initial parameters; the server's
parameters) travel whole, or, when the Welcome gave the stream a chunk size and the tensor is larger, as a
header (the message, its tensor `chunked` and empty) followed by TensorChunk messages of exactly that size,
the last the rest (proto/ps/v1/parameter_server.proto). The server's streams, ps-worker's and
RemoteOptimizer's client, the benchmark's echo and pushers all send with a `Sender` and receive with a
`Receiver`, so the rules (negotiation, piece sizes, order, the header's checks) are written once, here:
`ormo_ps.common.wire` frames the messages (one copy of a tensor's bytes each way) and `ormo_ps.common.chunks` puts the bytes
of one chunked tensor back together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ormo_ps.common.chunks import BufferPool, ChunkError, Reassembly
from ormo_ps.common.tensor_header import CodecError, chunked_nbytes
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.wire import Received, gradient_messages, parameters_messages, ready_messages

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Receiver", "Sender", "TransportError", "carried_tensor"]

# The payloads that carry a tensor: (the field of the payload that holds it, its name in messages).
_CARRIERS = {"gradient": ("tensor", "gradient"), "parameters": ("tensor", "parameters"),
             "ready": ("parameters", "initial parameters")}


class TransportError(ValueError):
    """A message that does not continue the stream's tensors as agreed. `reason`: "malformed" for a chunk
    sequence (out of order, of the wrong size, a chunk with none announced, another message amid the
    chunks), "tensor" for a chunked tensor's header (its size or dtype, chunks not negotiated)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def carried_tensor(message: pb.WorkerMessage | pb.ServerMessage) -> tuple[str, pb.Tensor] | None:
    """(the tensor's name in messages, the Tensor) of a message that carries one, else None."""
    kind = message.WhichOneof("payload")
    carrier = _CARRIERS.get(kind)
    if carrier is None:
        return None
    body = getattr(message, kind)
    if not body.HasField(carrier[0]):
        return None
    return carrier[1], getattr(body, carrier[0])


class Sender:
    """The messages one stream sends its tensors in: whole, or chunked above `chunk_bytes` (the Welcome's
    size; 0: every tensor whole), gradients and parameters as the run's `wire_dtype` (a torch dtype; None:
    as they are), rounded by `ormo_ps.common.wire_dtype.to_wire`. Each method returns the serialized messages,
    to be written in order. (Imports no torch itself: the benchmark's pushers send prepared arrays.)"""

    def __init__(self, chunk_bytes: int = 0, wire_dtype: Any = None, scratch: Any = None) -> None:
        if chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype
        # (common.wire_dtype.Scratch) buffers the rounding reuses: the messages copy the bytes before the next use
        self.scratch = scratch

    def _on_wire(self, t: Any, what: str, check: bool) -> Any:
        if self.wire_dtype is None or not hasattr(t, "is_floating_point") or t.dtype == self.wire_dtype:
            return t
        from ormo_ps.common.wire_dtype import to_wire  # (torch is imported already: t is a torch tensor)

        return to_wire(t, self.wire_dtype, what, check, self.scratch)

    def gradient(self, t: torch.Tensor | np.ndarray, iteration_index: int, loss: float,
                 sample_count: int = 0) -> list[bytes]:
        """A float16 overflow goes as the Inf it is: the server refuses it, as any non-finite gradient."""
        return gradient_messages(self._on_wire(t, "the gradient", check=False), iteration_index, loss,
                                 sample_count, self.chunk_bytes)

    def parameters(self, t: torch.Tensor | np.ndarray, iteration_index: int, epoch: float) -> list[bytes]:
        """CodecError when the parameters overflow the float16 wire."""
        return parameters_messages(self._on_wire(t, "the parameters", check=True), iteration_index, epoch,
                                   self.chunk_bytes)

    def ready(self, ready: pb.Ready, t: torch.Tensor | np.ndarray) -> list[bytes]:
        """`ready` with `t` as the client's initial parameters (float32 whatever the wire dtype: they become the
        server's master parameters)."""
        return ready_messages(ready, t, self.chunk_bytes)


# What a receiver expects of a chunked tensor's header: (numel, pb.DType value) of the tensor a message carries
# (None: anything), from the tensor's name and the message. It may raise to refuse the message outright.
Expectation = Callable[[str, Any], tuple[int | None, int | None]]


class Receiver:
    """One stream's receiving side: `take` each message read from the stream; it returns the message (with its
    tensor's bytes beside it, `Received.tensor_data`) once it is whole, None while a chunked tensor's pieces
    are still coming. Chunks are taken only when the stream negotiated them (`chunk_bytes` > 0, else
    `why_whole` says why not), only for tensors larger than that, in pieces of exactly that size (the last the
    rest), in order. A bad message raises TransportError and leaves the receiver ready for a new tensor.

    The bytes of a chunked tensor are a view of a buffer from `pool`, already given back to it: read them
    before the next `take` (every side here handles a message before it reads the next one)."""

    def __init__(self, pool: BufferPool | None = None, chunk_bytes: int = 0, *, expect: Expectation | None = None,
                 why_whole: str = "the Welcome said chunk_bytes 0", announcement: str = "Gradient") -> None:
        self._reassembly = Reassembly(pool if pool is not None else BufferPool())
        self.chunk_bytes = chunk_bytes
        self.expect = expect
        self.why_whole = why_whole
        self.announcement = announcement  # what chunks follow: "Gradient" (the server), "Parameters" (a client)
        self._name = ""  # the tensor being received, in messages

    @property
    def receiving(self) -> bool:
        """A chunked tensor's pieces are still coming."""
        return self._reassembly.assembly is not None

    def drop(self) -> None:
        """Forget the tensor being received (its stream ends)."""
        self._reassembly.drop()

    def take(self, received: Received) -> Received | None:
        message = received.message
        kind = message.WhichOneof("payload")
        assembly = self._reassembly.assembly
        if assembly is not None or kind == "chunk":
            if assembly is None or kind != "chunk":
                self.drop()
                what = (f"the next chunk of the {self._name} ({assembly.progress()})" if assembly is not None
                        else f"a chunked {self.announcement} before its chunks")
                raise TransportError("malformed", f"expected {what} on the Train stream, got "
                                                  f"{kind or 'an empty message'}")
            data = received.tensor_data if received.tensor_data is not None else message.chunk.data
            try:
                complete = self._reassembly.add(message.chunk.offset, data)
            except ChunkError as e:  # (the tensor is dropped)
                raise TransportError("malformed", f"bad {self._name} chunk: {e}") from None
            if complete is None:
                return None
            header, data = complete
            return Received(header.message, data)
        carried = carried_tensor(message)
        if carried is None or not carried[1].chunked:
            return received
        name, tensor = carried
        numel, dtype = self.expect(name, message) if self.expect is not None else (None, None)
        try:
            if received.tensor_data is not None:
                raise CodecError("a chunked tensor holds bytes itself; its bytes belong in its chunks")
            nbytes = chunked_nbytes(tensor, expected_numel=numel, expected_dtype=dtype)
            if self.chunk_bytes == 0:
                raise CodecError(f"chunked tensors were not negotiated on this stream ({self.why_whole}): "
                                 "send it whole")
            if nbytes <= self.chunk_bytes:
                raise CodecError(f"a tensor of {nbytes} bytes travels whole (the chunk size is "
                                 f"{self.chunk_bytes} bytes)")
        except CodecError as e:
            raise TransportError("tensor", f"bad {name} tensor: {e}") from None
        self._name = name
        self._reassembly.start(received, nbytes, self.chunk_bytes)
        return None
