"""Parameter layouts: which tensors (names, shapes, dtypes), in which order, make up a model's flat vector.

The server holds one flat vector; what it means is the layout of the model it came from. A client that
brings its own model (a RemoteOptimizer, a ps-worker) declares its layout, and the server compares it with
the run's (`mismatch`) before the client takes part: two models with the same number of parameters but
different tensors would otherwise exchange vectors that mean different things.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ormo_ps.common.codec import dtype_from_pb, dtype_to_pb
from ormo_ps.common.pb import parameter_server_pb2 as pb

__all__ = ["Layout", "ParamSpec", "from_pb", "from_state", "layout_of", "mismatch", "numel", "to_pb", "to_state"]


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {str(self.dtype).removeprefix('torch.')}"


Layout = tuple[ParamSpec, ...]


def layout_of(module: nn.Module) -> Layout:
    """The trainable parameters of `module` in `module.parameters()` order (the flat vector's order)."""
    return tuple(ParamSpec(name, tuple(p.shape), p.dtype) for name, p in module.named_parameters() if p.requires_grad)


def numel(layout: Layout) -> int:
    """Elements of the flat vector of `layout`."""
    return sum(math.prod(spec.shape) for spec in layout)


def to_pb(layout: Layout) -> pb.ParameterLayout:
    return pb.ParameterLayout(parameters=[pb.ParameterSpec(name=s.name, shape=s.shape, dtype=dtype_to_pb(s.dtype))
                                          for s in layout])


def from_pb(message: pb.ParameterLayout) -> Layout:
    """A layout from the wire; CodecError (a ValueError) for a dtype that has no wire form."""
    return tuple(ParamSpec(s.name, tuple(int(d) for d in s.shape), dtype_from_pb(s.dtype)) for s in message.parameters)


def to_state(layout: Layout) -> list[tuple[str, list[int], str]]:
    """Plain values for a checkpoint (which `torch.load(weights_only=True)` reads back)."""
    return [(s.name, list(s.shape), str(s.dtype).removeprefix("torch.")) for s in layout]


def from_state(state: list[tuple[str, list[int], str]]) -> Layout:
    return tuple(ParamSpec(name, tuple(shape), getattr(torch, dtype)) for name, shape, dtype in state)


def mismatch(expected: Layout, given: Layout) -> str | None:
    """None when `given` is `expected`; otherwise the first difference, in words."""
    if given == expected:
        return None
    for i, (want, got) in enumerate(zip(expected, given)):
        if want != got:
            return f"parameter {i} is {got.describe()} here, {want.describe()} in the run"
    if len(given) > len(expected):
        return (f"{len(given)} parameter tensors here, {len(expected)} in the run "
                f"(the first extra one: {given[len(expected)].describe()})")
    return (f"{len(given)} parameter tensors here, {len(expected)} in the run "
            f"(the first missing one: {expected[len(given)].describe()})")
