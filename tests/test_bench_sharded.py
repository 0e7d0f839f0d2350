"""Smoke test of bench/sharded.py (issue #23's measurements), so that the benchmark cannot rot.

`--quick` at its smallest (ResNet20, K=4, S=1 and 2, one window each) against real ps-server processes: the
pushers speak the sharded protocol to S=2 (a stream to each shard), every group's counts add up, the shards' CPU
and bytes are found. No timing is asserted. Also: the committed report is the one its JSON draws, and flat-N
resolves by import path (what the shards of a sharded flat-N server need).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import sharded
from bench.harness import RESULTS


def test_flat_model_import_path_resolves_anywhere() -> None:
    from bench.ps_server_sized import import_path
    from ormo_ps.common.models import build_model, count_parameters

    assert import_path(2048) == "bench.ps_server_sized:flat_2048"
    assert count_parameters(build_model(import_path(2048), 10, (3, 8, 8))) == 2048


# Two ps-server groups (torch imports, ResNet20 built, 2 shard processes) on 2 cores: ~25 s.
@pytest.mark.slow
def test_quick_run_measures_one_server_and_two_shards(tmp_path: Path) -> None:
    result = sharded.main(["--quick", "--reps", "1", "--window", "0.5", "--out", str(tmp_path / "quick")])
    (row,) = result["sizes"][0]["rows"]
    one, two = row["systems"]["S=1"], row["systems"]["S=2"]
    for v in (one, two):
        assert v["updates_per_s"] > 0, v
        assert v["final_counts"]["counts_add_up"], v["final_counts"]
        assert v["final_counts"]["pushers_done"] == 4
    assert "shard_cpu_s_per_update" not in one
    assert len(two["shard_cpu_s_per_update"]) == 2 and all(x > 0 for x in two["shard_cpu_s_per_update"])
    # each shard gets its slice: the two slices' messages add up to the whole gradient's plus framing
    assert sum(two["shard_up_bytes_per_update"]) == two["up_bytes_per_update"]
    assert 4 * 269_722 < two["up_bytes_per_update"] < 4 * 269_722 + 200
    assert (tmp_path / "quick.md").read_text().startswith(sharded.TITLE)


def test_report_redraws_the_committed_results() -> None:
    path = RESULTS / "sharded.json"
    if not path.exists():
        pytest.skip("no committed results yet")
    result = json.loads(path.read_text())
    drawn = "\n".join(sharded.markdown(result)).rstrip("\n") + "\n"
    committed = (RESULTS / "sharded.md").read_text()
    assert drawn[drawn.index("\n## "):] == committed[committed.index("\n## "):]
