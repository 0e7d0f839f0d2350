"""Smoke test of bench/throughput's machinery at tiny scale: counts add up, for the server and the echo.

K=2 synthetic pushers do 50 round trips each against the real ps-server (a subprocess) and against the
gRPC echo server. A pusher stops only right after a reply, so nothing is in flight at the end and the
server's applied count must equal the gradients sent. No timing is asserted. Also: the report drawn from
the committed results has the committed tables, goals, profile and notes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import RESULTS
from bench.throughput import report
from bench.throughput.groups import run_counted

K, ROUND_TRIPS = 2, 50


def test_pusher_imports_no_torch() -> None:
    """A pusher process stays light: what it imports (gRPC options included) needs no torch."""
    import subprocess
    import sys

    code = "import sys, bench.grad_pusher; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# The server case starts torch and builds the model in a subprocess (~4-5 s on 2 cores): slow.
@pytest.mark.parametrize("system,chunk_mib", [
    pytest.param("server", None, marks=pytest.mark.slow), ("echo", None),
    pytest.param("server", 0.01, marks=pytest.mark.slow, id="server-chunked"),
    pytest.param("echo", 0.01, id="echo-chunked")])
def test_counts_add_up(system: str, chunk_mib: float | None, tmp_path: Path) -> None:
    # The server runs the small mlp on the synthetic data (fast start-up); the echo announces the same size.
    # Chunked at 0.01 MiB, its 104 kB tensors travel in ten pieces each way.
    numel = 192 * 128 + 128 + 128 * 10 + 10  # mlp on 3x8x8 inputs, 10 classes
    counts = run_counted(system, K, ROUND_TRIPS, size="resnet20", numel=numel, workdir=tmp_path, timeout=60.0,
                         model="mlp", chunk_mib=chunk_mib)
    assert counts["numel"] == numel
    assert counts["pushers_done"] == K
    assert counts["replies"] == K * ROUND_TRIPS
    assert counts["sent"] == K * ROUND_TRIPS
    assert counts["in_flight"] == counts["sent"] - counts["replies"] == 0
    assert counts["applied"] == counts["sent"] - counts["in_flight"]
    # message sizes: the tensor plus a few bytes of framing (per piece), both ways
    framing = 64 if chunk_mib is None else 64 + 16 * 10
    assert 4 * numel < counts["up_bytes"] < 4 * numel + framing
    assert 4 * numel < counts["down_bytes"] < 4 * numel + framing


# The bfloat16 wire (issue #25): pushers send 2 bytes an element where the Welcome says so, the echo echoes them,
# ps-server applies them and answers in bfloat16; torch RPC's ranks send bfloat16 tensors too.
@pytest.mark.parametrize("system", [pytest.param("server-bf16", marks=pytest.mark.slow), "echo-bf16",
                                    pytest.param("torch-rpc-bf16", marks=pytest.mark.slow)])
def test_counts_add_up_on_a_bfloat16_wire(system: str, tmp_path: Path) -> None:
    numel = 192 * 128 + 128 + 128 * 10 + 10
    counts = run_counted(system, K, ROUND_TRIPS, size="resnet20", numel=numel, workdir=tmp_path, timeout=60.0,
                         model="mlp")
    assert counts["pushers_done"] == K and counts["replies"] == counts["sent"] == K * ROUND_TRIPS
    assert counts["applied"] == counts["sent"]
    assert 2 * numel <= counts["up_bytes"] < 2 * numel + 64  # half of float32's
    assert 2 * numel <= counts["down_bytes"] < 2 * numel + 64


@pytest.mark.parametrize("name", ["throughput", "throughput_large_k16", "throughput_whole",
                                  "throughput_profile_11M_k4"])
def test_report_redraws_the_committed_results(name: str) -> None:
    """From the first table on, the Markdown drawn from a committed JSON is the committed Markdown, and the
    hand-written notes (bench/prose/throughput_notes.md) are the ones recorded with the latest full run."""
    result = json.loads((RESULTS / f"{name}.json").read_text())
    meta = result["meta"]
    if isinstance(meta["machine"], dict):  # written before bench/harness.py: no commit field either
        meta.update(machine=meta["machine"]["platform"], processor=meta["machine"]["processor"],
                    cpus=meta["machine"]["cores"], memory_gib=meta["machine"]["memory_gib"],
                    commit=meta["git_begin"]["head"])
    drawn = "\n".join(report.markdown(result)) + "\n"
    committed = (RESULTS / f"{name}.md").read_text()
    assert drawn[drawn.index("\n## "):] == committed[committed.index("\n## "):]
    if name == "throughput":  # the latest full run carries today's notes; older results keep theirs
        assert report.notes() == result["notes"]
