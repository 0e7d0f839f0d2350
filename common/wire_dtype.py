"""The run's wire dtype: what a worker's gradients and the parameters sent to it travel as on the Train stream
(`--wire-dtype float32|bfloat16|float16`), and the one rounding every side and the simulator apply.

The server keeps float32 master parameters and rule state and applies in float32: a gradient that came as
bfloat16 or float16 is widened exactly, and the parameters are rounded to the wire dtype on their way out
(round to nearest, ties to even: torch's cast). So a run's arithmetic is float32's with two roundings per
round trip, the gradient's and the parameters', which `round_trip` lets the simulator apply at the same
places: a simulated bfloat16 run is the run the service does. float16 holds at most 65504 in magnitude: a
larger value would travel as an infinity, which `to_wire` refuses for the parameters (with a clear error),
and the server refuses for a gradient as it refuses any non-finite one (server/faults.py).
"""

from __future__ import annotations

import torch

from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.tensor_checks import all_finite, max_magnitude
from ormo_ps.common.tensor_header import CodecError

__all__ = ["WIRE_DTYPES", "Scratch", "from_pb", "overflow_hint", "round_trip", "to_pb", "to_wire"]

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PB = {torch.float32: pb.DTYPE_FLOAT32, torch.bfloat16: pb.DTYPE_BFLOAT16, torch.float16: pb.DTYPE_FLOAT16}
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def to_pb(dtype: torch.dtype) -> int:
    return _PB[dtype]


def from_pb(value: int) -> torch.dtype:
    """The wire dtype a Welcome names (DTYPE_UNSPECIFIED, a server before wire dtypes: float32)."""
    for dtype, number in _PB.items():
        if number == value:
            return dtype
    if value == pb.DTYPE_UNSPECIFIED:
        return torch.float32
    raise CodecError(f"the run's wire dtype {value} is not one of float32, bfloat16, float16")


def overflow_hint(dtype: torch.dtype) -> str:
    """What a non-finite value on this wire may mean, for error messages ('' for the others)."""
    if dtype != torch.float16:
        return ""
    return (f" (on the float16 wire a magnitude above {FLOAT16_MAX:g} arrives as Inf; --wire-dtype bfloat16 keeps "
            "float32's range)")


class Scratch:
    """Conversion buffers used again, one per dtype and size: converting 11M parameters into a fresh tensor costs
    page faults (a 44 MB float32 buffer is above glibc's mmap threshold) several times the conversion itself
    (bench/results/update_cost.md: 9.8 ms against 1.2 ms into a buffer used again). A buffer handed out is valid
    until the next call for the same dtype and size: its reader copies or frames it before then."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buffer = self._buffers.get((dtype, numel))
        if buffer is None:
            buffer = self._buffers[(dtype, numel)] = torch.empty(numel, dtype=dtype)
        return buffer

    def widen(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`t` (a flat bfloat16 or float16 tensor on the CPU) as `dtype`, exactly, in a buffer used again."""
        if t.dtype == dtype:
            return t
        return self.get(dtype, t.numel()).copy_(t)


def to_wire(t: torch.Tensor, dtype: torch.dtype, what: str = "tensor", check: bool = True,
            scratch: Scratch | None = None) -> torch.Tensor:
    """`t` (float32) as the wire dtype, rounded to nearest even (in a buffer of `scratch` when given and `t` is a
    flat CPU tensor); `t` itself for float32. With `check`, a float16 overflow (a finite element beyond
    float16's range) is a CodecError, not an infinity sent."""
    if dtype == t.dtype:
        return t
    if scratch is not None and t.dim() == 1 and t.device.type == "cpu":
        out = scratch.get(dtype, t.numel()).copy_(t)
    else:
        out = t.to(dtype)
    # (aminmax of the float16 result: a fast read, where a float32 sum of float16 would not be)
    if check and dtype == torch.float16 and max_magnitude(out) == float("inf") and all_finite(t):
        raise CodecError(f"{what} would overflow the float16 wire: the largest magnitude, {max_magnitude(t):.4g}, is "
                         f"above {FLOAT16_MAX:g}; --wire-dtype bfloat16 keeps float32's range")
    return out


def round_trip(t: torch.Tensor, dtype: torch.dtype, what: str = "tensor", check: bool = True) -> torch.Tensor:
    """What the other side holds after `t` crossed the wire: rounded to `dtype`, widened back to t's dtype (a
    new tensor, also for float32)."""
    if dtype == t.dtype:
        return t.clone()
    return to_wire(t, dtype, what, check).to(t.dtype)
