"""Train-stream messages with their one big field (`Tensor.data`) framed by hand: fewer copies of it.

The protobuf Python API copies a bytes field on every crossing: parsing copies it into the message,
reading `tensor.data` copies it out again, `encode` copies the tensor into a bytes object and once more
into the message, and serializing copies the whole message. For a megabyte tensor each copy costs about
as much as the OrMo update itself (the server's profile in bench/results/throughput.md: memcpy was the
largest single item). This module does the same messages with one copy of the tensor per direction:

- `serialize_parameters(t, iteration_index, epoch)` → the bytes of a `ServerMessage{parameters}`: the
  small fields serialized by protobuf, then a second `parameters{tensor{data}}` record written by hand
  and spliced with the tensor's memory in one `join`. Protobuf parsers merge repeated occurrences of an
  embedded message field, so any parser reads exactly the message `encode` would have built.
- `parse_worker_message(buf)` → `Received(message, tensor_data)`: the tensor's bytes are found in the
  wire format and handed out as a zero-copy memoryview of `buf`; the rest, with that field emptied, is
  parsed by protobuf as usual (so malformed input raises the same DecodeError). Whenever the layout is
  not the plain one (the field repeated, groups, anything unexpected) it falls back to a full protobuf
  parse: the result is always the message `WorkerMessage.FromString(buf)` gives.

`server.service.add_to_server` registers them as the Train method's (de)serializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.codec import wire_array
from common.pb import parameter_server_pb2 as pb

__all__ = ["Received", "parse_worker_message", "serialize_parameters", "serialize_server_message"]

_LEN = 2  # wire types
_VARINT, _I64, _I32 = 0, 1, 5


def _number(message: type, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_PARAMETERS = _number(pb.ServerMessage, "parameters")
_PARAMETERS_TENSOR = _number(pb.Parameters, "tensor")
_GRADIENT = _number(pb.WorkerMessage, "gradient")
_GRADIENT_TENSOR = _number(pb.Gradient, "tensor")
_TENSOR_DATA = _number(pb.Tensor, "data")
_GRADIENT_DATA_PATH = (_GRADIENT, _GRADIENT_TENSOR, _TENSOR_DATA)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_header(field: int, length: int) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(length)


def serialize_parameters(t: torch.Tensor | np.ndarray, iteration_index: int, epoch: float) -> bytes:
    """The serialized `ServerMessage(parameters=Parameters(tensor=encode(t), iteration_index, epoch))`,
    with one copy of the tensor's bytes."""
    wire, array = wire_array(t)
    head = pb.ServerMessage()
    head.parameters.iteration_index = iteration_index
    head.parameters.epoch = epoch
    head.parameters.tensor.dtype = wire.pb_dtype
    head.parameters.tensor.numel = array.size
    nbytes = array.nbytes
    data_header = _len_header(_TENSOR_DATA, nbytes)
    tensor_len = len(data_header) + nbytes
    tensor_header = _len_header(_PARAMETERS_TENSOR, tensor_len)
    parameters_header = _len_header(_PARAMETERS, len(tensor_header) + tensor_len)
    payload = memoryview(array).cast("B") if nbytes else b""
    return b"".join((head.SerializeToString(), parameters_header, tensor_header, data_header, payload))


def serialize_server_message(message: pb.ServerMessage | bytes) -> bytes:
    """Train's response serializer: messages built by `serialize_parameters` pass through as they are."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


@dataclass(frozen=True, slots=True)
class Received:
    """A parsed WorkerMessage; for a gradient, `tensor_data` holds `gradient.tensor.data` (a read-only view
    of the received buffer) and the message's own field is empty. None when the bytes stayed in the message."""

    message: pb.WorkerMessage
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


def parse_worker_message(buf: bytes) -> Received:
    """Train's request deserializer (see the module's docstring). Raises DecodeError as FromString does."""
    try:
        pieces, d0, d1 = _strip(buf, 0, len(buf), _GRADIENT_DATA_PATH)
    except _Irregular:
        return Received(pb.WorkerMessage.FromString(buf))
    message = pb.WorkerMessage.FromString(b"".join(pieces))
    if message.WhichOneof("payload") != "gradient":  # another payload came later and won the oneof
        return Received(pb.WorkerMessage.FromString(buf))
    return Received(message, memoryview(buf)[d0:d1])
