"""Tensor codec: the only place that turns tensors into ps.v1.Tensor bytes and back, and checks their values."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ormo_ps.common import tensor_header
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.tensor_checks import all_finite, check_finite, max_magnitude
from ormo_ps.common.tensor_header import CodecError

__all__ = ["CodecError", "all_finite", "check_finite", "chunked_nbytes", "decode", "dtype_from_pb", "dtype_to_pb",
           "encode", "max_magnitude"]



@dataclass(frozen=True)
class _Wire:
    """How one whitelisted dtype is laid out on the wire."""

    pb_dtype: int
    torch_dtype: torch.dtype
    # Little-endian numpy dtype of the same width; bfloat16 has none, so it travels as int16 bits.
    np_dtype: np.dtype

    @property
    def name(self) -> str:
        return pb.DType.Name(self.pb_dtype)


_WIRE = (
    _Wire(pb.DTYPE_FLOAT32, torch.float32, np.dtype("<f4")),
    _Wire(pb.DTYPE_FLOAT16, torch.float16, np.dtype("<f2")),
    _Wire(pb.DTYPE_BFLOAT16, torch.bfloat16, np.dtype("<i2")),
    _Wire(pb.DTYPE_FLOAT64, torch.float64, np.dtype("<f8")),
)
_BY_PB = {w.pb_dtype: w for w in _WIRE}
_BY_TORCH = {w.torch_dtype: w for w in _WIRE}
# Native numpy dtypes accepted by encode; numpy has no bfloat16 (int16 arrays are NOT bfloat16).
_BY_NUMPY = {
    np.dtype(np.float32): _BY_PB[pb.DTYPE_FLOAT32],
    np.dtype(np.float16): _BY_PB[pb.DTYPE_FLOAT16],
    np.dtype(np.float64): _BY_PB[pb.DTYPE_FLOAT64],
}
_ALLOWED = ", ".join(f"{w.name} ({w.torch_dtype})" for w in _WIRE)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _wire_for(dtype: object) -> _Wire:
    """The wire layout of a torch dtype, numpy dtype or pb.DType value; CodecError if not whitelisted."""
    if isinstance(dtype, torch.dtype):
        wire = _BY_TORCH.get(dtype)
    elif isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        wire = _BY_PB.get(int(dtype))
        if wire is None:
            known = pb.DType.Name(int(dtype)) if int(dtype) in pb.DType.values() else "unknown"
            raise CodecError(f"dtype {int(dtype)} ({known}) is not supported; allowed: {_ALLOWED}")
    else:
        try:
            wire = _BY_NUMPY.get(np.dtype(dtype).newbyteorder("="))  # type: ignore[arg-type]
        except TypeError:
            wire = None
    if wire is None:
        raise CodecError(f"dtype {dtype} is not supported; allowed: {_ALLOWED}")
    return wire


def dtype_to_pb(dtype: torch.dtype) -> int:
    """The ps.v1.DType value of a torch dtype (a parameter layout's element type); CodecError if none."""
    return _wire_for(dtype).pb_dtype


def dtype_from_pb(value: int) -> torch.dtype:
    """The torch dtype of a ps.v1.DType value; CodecError for DTYPE_UNSPECIFIED or an unknown value."""
    return _wire_for(int(value)).torch_dtype


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy without PyTorch's warning for read-only arrays (the caller documents read-only)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def wire_array(t: torch.Tensor | np.ndarray, dtype: torch.dtype | None = None) -> tuple[_Wire, np.ndarray]:
    """The wire dtype of `t` and its elements as a flat, C-contiguous, little-endian array: a view of `t`'s
    memory whenever no cast, device transfer or byte swap is needed. (`encode` and `ormo_ps.common.wire` use it.)"""
    if isinstance(t, np.ndarray):
        if dtype is not None:  # cast in torch, which knows bfloat16
            native = np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("="))
            return wire_array(torch.from_numpy(native), dtype)
        wire = _wire_for(t.dtype)
        array = t
    elif isinstance(t, torch.Tensor):
        if t.is_sparse or t.layout != torch.strided:
            raise CodecError(f"only dense tensors can be encoded, got layout {t.layout}")
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        wire = _wire_for(t.dtype)
        t = t.cpu().contiguous().reshape(-1)
        if wire.torch_dtype is torch.bfloat16:
            t = t.view(torch.int16)  # numpy has no bfloat16: ship the raw 16-bit patterns
        array = t.numpy()
    else:
        raise TypeError(f"encode expects a torch.Tensor or numpy.ndarray, got {type(t).__name__}")
    # A no-op view on little-endian hosts; a byte swap on big-endian ones.
    return wire, np.ascontiguousarray(array.reshape(-1), dtype=wire.np_dtype)


def encode(
    t: torch.Tensor | np.ndarray, *, dtype: torch.dtype | None = None, out: pb.Tensor | None = None
) -> pb.Tensor:
    """Encodes a tensor or array as a flat pb.Tensor (any shape is flattened, C order) and returns it.

    dtype, when given, casts first (e.g. torch.bfloat16 to halve a gradient's size). GPU tensors are
    copied to the host. The element bytes are copied once (``tobytes``) and protobuf copies them once
    more into the message, which no protobuf API avoids (``ormo_ps.common.wire`` frames the bytes by hand for the
    server's hot path). out, when given, is a pb.Tensor field of the message being built
    (``encode(g, out=msg.gradient.tensor)``): filling it in place saves the further full copy that
    assigning or CopyFrom-ing a finished pb.Tensor into a parent message costs.
    """
    wire, array = wire_array(t, dtype)
    if out is None:
        return pb.Tensor(dtype=wire.pb_dtype, numel=array.size, data=array.tobytes())
    out.dtype, out.numel, out.data = wire.pb_dtype, array.size, array.tobytes()
    return out


def decode(
    msg: pb.Tensor,
    *,
    expected_numel: int | None = None,
    expected_dtype: torch.dtype | np.dtype | int | None = None,
    device: torch.device | str = "cpu",
    copy: bool = True,
    data: bytes | memoryview | None = None,
) -> torch.Tensor:
    """Checks a pb.Tensor and returns it as a 1-D tensor of its own dtype on device.

    Raises CodecError, naming what was expected and what came, when the dtype is unspecified, unknown or
    not expected_dtype, when numel is not expected_numel, or when len(data) != numel * itemsize.

    copy=True (default) returns a tensor that owns writable memory (one extra host copy, ~the cost of
    a memcpy). copy=False skips that copy on the CPU: the tensor then shares the bytes object read from
    the message, which Python treats as immutable, so it must only be read, never written in place
    (the server reading a gradient once may use it). Decoding to another device always copies.

    data, when given, stands for ``msg.data`` (which must then be empty): the bytes that
    ``ormo_ps.common.wire`` kept out of the message, as a view of the received buffer, or a chunked tensor's bytes
    put back together (ormo_ps.common.chunks). A chunked tensor (``msg.chunked``) must come with them.
    """
    wire = _checked_header(msg, expected_numel, expected_dtype)
    numel = msg.numel
    if data is None:
        if msg.chunked:
            raise CodecError("the tensor is chunked: its bytes come in the chunks that follow it")
        data = msg.data  # upb hands out a fresh bytes copy on every access: read it once
    elif msg.data:
        raise CodecError("tensor data given twice (in the message and beside it)")
    size = wire.np_dtype.itemsize
    if len(data) != numel * size:
        raise CodecError(
            f"tensor data is {len(data)} bytes, expected numel {numel} x {size} bytes ({wire.name}) "
            f"= {numel * size} bytes"
        )
    array = np.frombuffer(data, dtype=wire.np_dtype)
    if not _LITTLE_ENDIAN:
        array = array.astype(wire.np_dtype.newbyteorder("="))  # copies into native, writable memory
    elif copy and torch.device(device).type == "cpu":
        array = array.copy()
    # Read-only only with copy=False, where the bytes object is private to this call (see above) and the
    # caller was told not to write: PyTorch's non-writable-buffer warning would be noise to users.
    out = _from_numpy(array)
    if wire.torch_dtype is torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out.to(device)


def _checked_header(msg: pb.Tensor, expected_numel: int | None, expected_dtype: object) -> _Wire:
    want = None if expected_dtype is None else _wire_for(expected_dtype).pb_dtype
    tensor_header.check_header(msg, expected_numel, want)
    return _BY_PB[msg.dtype]


def chunked_nbytes(
    msg: pb.Tensor, *, expected_numel: int | None = None, expected_dtype: torch.dtype | np.dtype | int | None = None
) -> int:
    """The number of bytes a chunked tensor's pieces must add up to (numel x itemsize), after the checks
    `decode` makes of its header; CodecError as decode's, or when it is not chunked or holds data itself."""
    want = None if expected_dtype is None else _wire_for(expected_dtype).pb_dtype
    return tensor_header.chunked_nbytes(msg, expected_numel, want)


