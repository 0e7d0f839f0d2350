"""Train-stream messages with their one big field (a tensor's bytes) framed by hand: fewer copies of it.

The protobuf Python API copies a bytes field on every crossing: parsing copies it into the message,
reading `tensor.data` copies it out again, `encode` copies the tensor into a bytes object and once more
into the message, and serializing copies the whole message. For a megabyte tensor each copy costs about
as much as the OrMo update itself (the server's profile in bench/results/throughput.md: memcpy was the
largest single item). This module does the Train messages with one copy of the tensor per direction:

- `parameters_messages(t, iteration_index, epoch, chunk_bytes)` and `gradient_messages(...)` -> the bytes
  of the `ServerMessage{parameters}` / `WorkerMessage{gradient}` that carry `t`: the small fields serialized
  by protobuf, the length-prefixed records around `tensor.data` written by hand, and the tensor's memory
  spliced in with one `join` (the bytes are those protobuf writes, up to field order). A tensor larger than
  `chunk_bytes` (> 0) comes out as that message with `tensor.chunked` set and no data, followed by its
  TensorChunk messages (common/chunks.py).
- `parse_worker_message(buf)` / `parse_server_message(buf)` -> `Received(message, tensor_data)`: the
  tensor's bytes (a gradient's or parameters' `tensor.data`, or a chunk's `data`) are found in the wire
  format and handed out as a zero-copy memoryview of `buf`; the rest, with that field emptied, is parsed
  by protobuf as usual (so malformed input raises the same DecodeError). Whenever the layout is not the
  plain one (the field repeated, groups, anything unexpected) it falls back to a full protobuf parse: the
  result is always the message `FromString(buf)` gives.

`ormo_ps.server.servicer.add_to_server` registers them as the server's Train (de)serializers, `train_call` as a
client's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.message import Message

from ormo_ps.common.chunks import pieces
from ormo_ps.common.pb import parameter_server_pb2 as pb

if TYPE_CHECKING:
    import torch

_FLOAT32 = np.dtype("<f4")

__all__ = ["Received", "gradient_messages", "parameters_messages", "parse_server_message", "parse_worker_message",
           "ready_messages", "serialize_message", "serialize_parameters", "train_call"]

_LEN = 2  # wire types
_VARINT, _I64, _I32 = 0, 1, 5


def _number(message: type, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_PARAMETERS = _number(pb.ServerMessage, "parameters")
_PARAMETERS_TENSOR = _number(pb.Parameters, "tensor")
_GRADIENT = _number(pb.WorkerMessage, "gradient")
_GRADIENT_TENSOR = _number(pb.Gradient, "tensor")
_READY = _number(pb.WorkerMessage, "ready")
_READY_PARAMETERS = _number(pb.Ready, "parameters")
_TENSOR_DATA = _number(pb.Tensor, "data")
_CHUNK_DATA = _number(pb.TensorChunk, "data")
_WORKER_CHUNK = _number(pb.WorkerMessage, "chunk")
_SERVER_CHUNK = _number(pb.ServerMessage, "chunk")
assert _WORKER_CHUNK == _SERVER_CHUNK  # one chunk writer serves both directions
_PARAMETERS_DATA_PATH = (_PARAMETERS, _PARAMETERS_TENSOR, _TENSOR_DATA)
_GRADIENT_DATA_PATH = (_GRADIENT, _GRADIENT_TENSOR, _TENSOR_DATA)
_READY_DATA_PATH = (_READY, _READY_PARAMETERS, _TENSOR_DATA)
_CHUNK_DATA_PATH = (_WORKER_CHUNK, _CHUNK_DATA)
# The fast path to try for a message, by its payload's field number (the first byte of a plain message).
_WORKER_PATHS = {_GRADIENT: ("gradient", _GRADIENT_DATA_PATH), _WORKER_CHUNK: ("chunk", _CHUNK_DATA_PATH)}
_SERVER_PATHS = {_PARAMETERS: ("parameters", _PARAMETERS_DATA_PATH), _SERVER_CHUNK: ("chunk", _CHUNK_DATA_PATH)}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_header(field: int, length: int) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(length)


def _prefix(levels: list[bytes], path: tuple[int, ...], nbytes: int) -> bytes:
    """The bytes before a payload of `nbytes` nested at `path`: at each depth i the message's other fields
    (`levels[i]`, serialized) and then the one record of field path[i] that holds the next depth. One record
    per field, so `_strip` finds the payload on the way back in."""
    prefix = b""
    for small, field in zip(reversed(levels), reversed(path)):
        prefix = small + _len_header(field, len(prefix) + nbytes) + prefix
    return prefix


def _with_tensor(message: Message, body: Message, tensor: pb.Tensor, path: tuple[int, ...],
                 t: torch.Tensor | np.ndarray, chunk_bytes: int) -> list[bytes]:
    """The messages that send `message` (whose payload `body` holds `tensor`, at `path`) with `t` as that
    tensor's data: one whole message, or its chunked header and the chunks."""
    tensor.dtype, array = _flat(t)
    tensor.numel = array.size
    nbytes = array.nbytes
    payload = memoryview(array).cast("B") if nbytes else b""
    spans = pieces(nbytes, chunk_bytes)
    if len(spans) > 1:
        tensor.chunked = True
        return [message.SerializeToString(), *(_chunk(offset, payload[offset:end]) for offset, end in spans)]
    tensor_fields = tensor.SerializeToString()
    body.ClearField(body.DESCRIPTOR.fields_by_number[path[1]].name)  # `message` is not used after this
    levels = [b"", body.SerializeToString(), tensor_fields]
    return [b"".join((_prefix(levels, path, nbytes), payload))]


def _flat(t: torch.Tensor | np.ndarray | tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    """The wire dtype of `t` and its elements as a flat little-endian array (`ormo_ps.common.codec.wire_array`). A flat
    float32 array needs no torch: the benchmark's pushers send those and import no torch (290 MB each); so does a
    (pb.DType, flat array) pair, the array already in that dtype's wire layout (bfloat16 as its 16-bit patterns)."""
    if isinstance(t, tuple):
        return t
    if isinstance(t, np.ndarray) and t.dtype == _FLOAT32 and t.ndim == 1 and t.flags.c_contiguous:
        return pb.DTYPE_FLOAT32, t
    from ormo_ps.common.codec import wire_array  # torch's tensors come with torch imported already

    wire, array = wire_array(t)
    return wire.pb_dtype, array


def _chunk(offset: int, data: memoryview) -> bytes:
    """A `{Worker,Server}Message{chunk{offset, data}}` (the same bytes in either direction)."""
    levels = [b"", pb.TensorChunk(offset=offset).SerializeToString()]
    return b"".join((_prefix(levels, _CHUNK_DATA_PATH, len(data)), data))


def parameters_messages(t: torch.Tensor | np.ndarray, iteration_index: int, epoch: float,
                        chunk_bytes: int = 0) -> list[bytes]:
    """The serialized `ServerMessage(parameters=Parameters(tensor=encode(t), iteration_index, epoch))`, or,
    when `t` is larger than `chunk_bytes` (> 0), its chunked header and chunks; one copy of the tensor."""
    message = pb.ServerMessage()
    body = message.parameters
    body.iteration_index = iteration_index
    body.epoch = epoch
    return _with_tensor(message, body, body.tensor, _PARAMETERS_DATA_PATH, t, chunk_bytes)


def serialize_parameters(t: torch.Tensor | np.ndarray, iteration_index: int, epoch: float) -> bytes:
    """`parameters_messages` as one whole message."""
    return parameters_messages(t, iteration_index, epoch)[0]


def gradient_messages(t: torch.Tensor | np.ndarray, iteration_index: int, loss: float, sample_count: int = 0,
                      chunk_bytes: int = 0) -> list[bytes]:
    """The serialized `WorkerMessage(gradient=Gradient(tensor=encode(t), iteration_index, loss, sample_count))`,
    chunked as `parameters_messages`; one copy of the tensor."""
    message = pb.WorkerMessage()
    body = message.gradient
    body.iteration_index = iteration_index
    body.loss = loss
    body.sample_count = sample_count
    return _with_tensor(message, body, body.tensor, _GRADIENT_DATA_PATH, t, chunk_bytes)


def ready_messages(ready: pb.Ready, t: torch.Tensor | np.ndarray, chunk_bytes: int = 0) -> list[bytes]:
    """The serialized `WorkerMessage(ready=ready)` with `t` as its initial parameters, chunked as
    `parameters_messages` (a client model's w_0 of any size, under the server's receive limit)."""
    message = pb.WorkerMessage()
    body = message.ready
    body.CopyFrom(ready)
    return _with_tensor(message, body, body.parameters, _READY_DATA_PATH, t, chunk_bytes)


def serialize_message(message: Message | bytes) -> bytes:
    """Train's serializer, both ways: messages this module built pass through as they are."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()



@dataclass(frozen=True, slots=True)
class Received:
    """A parsed WorkerMessage or ServerMessage; for a gradient, parameters or chunk, `tensor_data` holds its
    tensor's (or chunk's) `data` (a read-only view of the received buffer) and the message's own field is
    empty. None when the bytes stayed in the message (the fallback parse)."""

    message: pb.WorkerMessage | pb.ServerMessage
    tensor_data: memoryview | None = None


class _Irregular(Exception):
    """The wire layout is not the plain one: parse the slow, general way."""


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Irregular
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _find_only(buf: bytes, start: int, end: int, field: int) -> tuple[int, int, int]:
    """The one LEN record of `field` in the message body buf[start:end]: (length-prefix start, payload start,
    payload end). _Irregular when it is absent, repeated, not LEN, or the body does not parse."""
    found = None
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _read_varint(buf, pos, end)
            continue
        if wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            prefix = pos
            length, pos = _read_varint(buf, pos, end)
            if number == field:
                if found is not None:
                    raise _Irregular
                found = (prefix, pos, pos + length)
            pos += length
        else:  # groups, or garbage
            raise _Irregular
        if number == field and wire_type != _LEN:
            raise _Irregular
    if pos != end or found is None or found[2] > end:
        raise _Irregular
    return found


def _strip(buf: bytes, start: int, end: int, path: tuple[int, ...]) -> tuple[list[bytes], int, int]:
    """buf[start:end] re-encoded with the field at `path` emptied (pieces to join), and that field's span."""
    prefix, p0, p1 = _find_only(buf, start, end, path[0])
    if len(path) == 1:
        inner: list[bytes] = []
        d0, d1 = p0, p1
    else:
        inner, d0, d1 = _strip(buf, p0, p1, path[1:])
    return [buf[start:prefix], _varint(sum(map(len, inner))), *inner, buf[p1:end]], d0, d1


def _parse(buf: bytes, cls: type[Message], paths: dict[int, tuple[str, tuple[int, ...]]]) -> Received:
    known = paths.get(buf[0] >> 3) if buf and buf[0] < 0x80 else None
    if known is None:
        return Received(cls.FromString(buf))
    payload, path = known
    try:
        pieces_, d0, d1 = _strip(buf, 0, len(buf), path)
    except _Irregular:
        return Received(cls.FromString(buf))
    message = cls.FromString(b"".join(pieces_))
    if message.WhichOneof("payload") != payload:  # another payload came later and won the oneof
        return Received(cls.FromString(buf))
    return Received(message, memoryview(buf)[d0:d1])


def parse_worker_message(buf: bytes) -> Received:
    """The server's Train request deserializer (see the module's docstring). Raises DecodeError as FromString."""
    return _parse(buf, pb.WorkerMessage, _WORKER_PATHS)


def parse_server_message(buf: bytes) -> Received:
    """A client's Train response deserializer (see the module's docstring). Raises DecodeError as FromString."""
    return _parse(buf, pb.ServerMessage, _SERVER_PATHS)


def train_call(channel: grpc.aio.Channel) -> Callable[..., grpc.aio.StreamStreamCall]:
    """The Train method on `channel` with this module's framing: it writes WorkerMessages or the bytes of
    `gradient_messages`, and reads `Received` ServerMessages."""
    return channel.stream_stream("/ps.v1.ParameterServer/Train", request_serializer=serialize_message,
                                 response_deserializer=parse_server_message)
