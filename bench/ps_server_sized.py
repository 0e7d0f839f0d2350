"""`ps-server` with a model of any size: the real CLI and server, plus one flat model in the registry.

The model registry (common/models.py MODELS) has no ~11M or ~25M parameter model (its largest,
resnet110, has 1.7M), and the server builds w_0 from a registered model. This runner registers
`flat-N` (one trainable vector of N parameters, N(0, 0.01^2) values) in MODELS *in this process only*,
before the CLI's `--model` choices are built, then runs the unchanged `ormo_ps.server.cli.main` with the remaining
arguments. Everything after w_0 (core, service, gRPC options, checkpoints) is the real server's code.

    python -m bench.ps_server_sized --numel 11173962 -- --model flat-11173962 --dataset synthetic ...

A sharded server (`--shards S`) needs the import path instead: its ps-shard processes check the run's `--model`
when their coordinator attaches them (they are started by ps-server as `python -m ormo_ps.server.shard_cli`, with
no registration of flat-N), although they take w_0 from the coordinator. `bench.ps_server_sized:flat_N` names
the same model for every process that imports this module (module `__getattr__` below), so
`python -m ormo_ps.server.cli --model bench.ps_server_sized:flat_N --shards S ...` works from the repository root.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ormo_ps.common import models


class FlatVector(nn.Module):
    """No layers: one trainable vector, the size of the model the benchmark stands in for."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(numel) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never called by the server
        raise NotImplementedError("flat-N exists to give the server a w_0 of N parameters")


def flat_factory(numel: int):  # noqa: ANN201
    """The model factory of flat-N: (num_classes, input_shape) -> FlatVector(N)."""
    return lambda num_classes, input_shape: FlatVector(numel)


def __getattr__(name: str):  # noqa: ANN202 - `bench.ps_server_sized:flat_N` as a model import path
    prefix = "flat_"
    if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) > 0:
        return flat_factory(int(name[len(prefix):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def import_path(numel: int) -> str:
    """`--model` for flat-N that every process resolves by itself (the shards of a sharded server too)."""
    return f"{__name__.replace('__main__', 'bench.ps_server_sized')}:flat_{numel}"


def register(numel: int) -> str:
    name = f"flat-{numel}"
    models.MODELS[name] = flat_factory(numel)
    return name


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--numel" or "--" not in argv:
        raise SystemExit("usage: python -m bench.ps_server_sized --numel N -- SERVER_CLI_ARGS...")
    register(int(argv[1]))
    from ormo_ps.server.cli import main as server_main  # after register(): --model's choices include flat-N

    server_main(argv[argv.index("--") + 1:])


if __name__ == "__main__":
    main(sys.argv[1:])
