"""What a ps.v1.Tensor's header says, checked without torch: its dtype (one of the wire's four) and element
count against what is expected, and how many bytes it stands for. `ormo_ps.common.codec` decodes with these checks;
`ormo_ps.common.transport` checks a chunked tensor's header with them before its bytes come (the benchmark's
pushers, which import no torch, receive through it too)."""

from __future__ import annotations

from ormo_ps.common.pb import parameter_server_pb2 as pb

__all__ = ["ALLOWED", "CodecError", "ITEMSIZE", "check_header", "chunked_nbytes"]


class CodecError(ValueError):
    """A tensor message that cannot be encoded or decoded, or a tensor that fails a check."""


# The wire's dtypes: bytes per element, and the torch dtype each stands for (bfloat16 travels as its 16 bits).
ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT64: 8}
_TORCH_NAMES = {pb.DTYPE_FLOAT32: "torch.float32", pb.DTYPE_FLOAT16: "torch.float16",
                pb.DTYPE_BFLOAT16: "torch.bfloat16", pb.DTYPE_FLOAT64: "torch.float64"}
ALLOWED = ", ".join(f"{pb.DType.Name(d)} ({name})" for d, name in _TORCH_NAMES.items())


def _known(value: int) -> str:
    return pb.DType.Name(value) if value in pb.DType.values() else "unknown"


def check_header(msg: pb.Tensor, expected_numel: int | None = None, expected_dtype: int | None = None) -> int:
    """The bytes per element of `msg`'s dtype; CodecError, naming what was expected and what came, when the dtype
    is unspecified, not one of the wire's, or not `expected_dtype` (a pb.DType value), or when numel is not
    `expected_numel`."""
    if not isinstance(msg, pb.Tensor):
        raise TypeError(f"expects a ps.v1.Tensor message, got {type(msg).__name__}")
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise CodecError(f"tensor dtype is DTYPE_UNSPECIFIED; expected one of: {ALLOWED}")
    if msg.dtype not in ITEMSIZE:
        raise CodecError(f"dtype {msg.dtype} ({_known(msg.dtype)}) is not supported; allowed: {ALLOWED}")
    if expected_dtype is not None and msg.dtype != expected_dtype:
        raise CodecError(f"tensor dtype is {pb.DType.Name(msg.dtype)}, expected {_known(expected_dtype)}")
    if expected_numel is not None and msg.numel != expected_numel:
        raise CodecError(f"tensor numel is {msg.numel}, expected {expected_numel}")
    return ITEMSIZE[msg.dtype]


def chunked_nbytes(msg: pb.Tensor, expected_numel: int | None = None, expected_dtype: int | None = None) -> int:
    """The number of bytes a chunked tensor's pieces must add up to (numel x itemsize), after `check_header`;
    CodecError as that, or when the tensor is not chunked, holds data itself or has no elements."""
    itemsize = check_header(msg, expected_numel, expected_dtype)
    if not msg.chunked:
        raise CodecError("the tensor is not chunked")
    if msg.data:
        raise CodecError(f"a chunked tensor holds {len(msg.data)} bytes itself; its bytes belong in its chunks")
    if msg.numel == 0:
        raise CodecError("a chunked tensor of no elements")
    return msg.numel * itemsize
