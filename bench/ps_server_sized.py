"""`ps-server` with a model of any size: the real CLI and server, plus one flat model in the registry.

The model registry (common/models.py MODELS) has no ~11M or ~25M parameter model (its largest,
resnet110, has 1.7M), and the server builds w_0 from a registered model. This runner registers
`flat-N` (one trainable vector of N parameters, N(0, 0.01^2) values) in MODELS *in this process only*,
before the CLI's `--model` choices are built, then runs the unchanged `ormo_ps.server.cli.main` with the remaining
arguments. Everything after w_0 (core, service, gRPC options, checkpoints) is the real server's code.

    python -m bench.ps_server_sized --numel 11173962 -- --model flat-11173962 --dataset synthetic ...
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


def register(numel: int) -> str:
    name = f"flat-{numel}"
    models.MODELS[name] = lambda num_classes, input_shape: FlatVector(numel)
    return name


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--numel" or "--" not in argv:
        raise SystemExit("usage: python -m bench.ps_server_sized --numel N -- SERVER_CLI_ARGS...")
    register(int(argv[1]))
    from ormo_ps.server.cli import main as server_main  # after register(): --model's choices include flat-N

    server_main(argv[argv.index("--") + 1:])


if __name__ == "__main__":
    main(sys.argv[1:])
