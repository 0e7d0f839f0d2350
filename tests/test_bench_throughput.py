"""Smoke test of bench/throughput.py's machinery at tiny scale: counts add up, for the server and the echo.

K=2 synthetic pushers do 50 round trips each against the real ps-server (a subprocess) and against the
gRPC echo server. A pusher stops only right after a reply, so nothing is in flight at the end and the
server's applied count must equal the gradients sent. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
K, ROUND_TRIPS = 2, 50


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _load("throughput")


def test_pusher_message_options_match_the_codec() -> None:
    from common.grpc_options import GRPC_MESSAGE_OPTIONS

    assert _load("grad_pusher").GRPC_MESSAGE_OPTIONS == GRPC_MESSAGE_OPTIONS


# The server case starts torch and builds the model in a subprocess (~4-5 s on 2 cores): slow.
@pytest.mark.parametrize("system", [pytest.param("server", marks=pytest.mark.slow), "echo"])
def test_counts_add_up(throughput, system: str, tmp_path: Path) -> None:
    # The server runs the small mlp on the synthetic data (fast start-up); the echo announces the same size.
    numel = 192 * 128 + 128 + 128 * 10 + 10  # mlp on 3x8x8 inputs, 10 classes
    counts = throughput.run_counted(system, K, ROUND_TRIPS, size="resnet20", numel=numel, workdir=tmp_path,
                                    timeout=60.0, model="mlp")
    assert counts["numel"] == numel
    assert counts["pushers_done"] == K
    assert counts["replies"] == K * ROUND_TRIPS
    assert counts["sent"] == K * ROUND_TRIPS
    assert counts["in_flight"] == counts["sent"] - counts["replies"] == 0
    assert counts["applied"] == counts["sent"] - counts["in_flight"]
    # message sizes: the tensor plus a few bytes of framing, both ways
    assert 4 * numel < counts["up_bytes"] < 4 * numel + 64
    assert 4 * numel < counts["down_bytes"] < 4 * numel + 64
