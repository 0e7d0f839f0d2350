"""bench/paper_table.py, the paper's table on one GPU: its smoke run (the same code on the CPU, tiny) and its
deadline (runs stop, the table is written with what there is)."""

from __future__ import annotations

import json
import re
import time

import pytest

from bench import convergence, paper_table
from ormo_ps.common.metrics import read_metrics

COLUMNS = ["16 hom.", "16 het.", "64 hom.", "64 het."]


def _table(readme: str, title: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table under `## title`."""
    section = readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.strip().splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_the_smoke_run_writes_the_whole_table_and_the_figures(tmp_path):
    paper_table.main(["--smoke", "--out", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    table = _table(readme, "Test accuracy (%)")
    assert table[0] == ["method", *COLUMNS]
    rows = {row[0]: row[1:] for row in table[2:]}
    assert list(rows) == ["ASGD", "naive ASGDm", "shifted momentum", "SMEGA2", "OrMo", "OrMo-DA"]
    for cells in rows.values():  # every cell a finished run's test accuracy (one seed: no spread)
        assert all(re.fullmatch(r"\d+\.\d\d \(n=1\)", c) for c in cells), cells
    assert "40 server iterations" in readme and "gradients batched" in readme
    assert "did not finish" not in readme
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta["runs"].values()) == {"finished"} and len(meta["runs"]) == 24
    assert meta["iterations_done"] == 24 * 40
    assert list(tmp_path.glob("*.png"))
    # Each run computed its gradients batched, several per call.
    summary = read_metrics(tmp_path / "runs" / "ormo-K64-het-s0" / "metrics.jsonl")[-1]
    assert summary["event"] == "summary" and summary["batched_calls"] < summary["iterations"] / 4

    # Run again into the same folder: finished runs are not redone, the report is written again from them.
    paper_table.main(["--smoke", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["iterations_done"], meta["iterations_done_earlier"]) == (0, 24 * 40)
    again = (tmp_path / "README.md").read_text()
    assert _table(again, "Test accuracy (%)") == table and "960 more by earlier invocations" in again


def test_a_run_past_its_deadline_stops_after_the_epoch_it_is_in(tmp_path, monkeypatch):
    spec = dict(convergence.VARIANTS["paper-smoke"], iterations=20 * 93, algo="ormo", workers=4, het=False, seed=0,
                slow_factor=4.0, data_dir=None, batched=True, out=str(tmp_path / "late"))
    assert convergence.one_run(dict(spec, deadline=time.time() - 1))["status"] == "not started"
    assert not (tmp_path / "late").exists()

    # The study's clock passes the deadline while the first epoch runs, whatever this machine's speed: a run
    # checks it before each epoch (it once finished all 20 epochs within a wall-clock second here).
    from ormo_ps.sim.simulator import Simulator

    clock = {"now": 0.0}
    epoch = Simulator.simulate

    def simulate_one_epoch_late(self, stop_at=None):  # noqa: ANN001, ANN202
        result = epoch(self, stop_at)
        clock["now"] = 100.0
        return result

    monkeypatch.setattr(Simulator, "simulate", simulate_one_epoch_late)
    monkeypatch.setattr(convergence, "time", type("Clock", (), {"time": staticmethod(lambda: clock["now"]),
                                                                "monotonic": staticmethod(time.monotonic)}))
    r = convergence.one_run(dict(spec, deadline=50.0))
    assert r["status"] == "unfinished at iteration 93 of 1860" and r["iterations"] == 93
    events = [rec["event"] for rec in read_metrics(tmp_path / "late" / "metrics.jsonl")]
    assert events[0] == "start" and "summary" not in events


def test_a_study_whose_deadline_has_passed_still_writes_its_report(tmp_path):
    convergence.main(["--variant", "paper-smoke", "--deadline", "0", "--jobs", "1", "--seeds", "1", "--out", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    assert "No run got far enough to be tabled." in readme
    assert readme.count(": not started") == 24
    assert json.loads((tmp_path / "meta.json").read_text())["iterations_done"] == 0


def test_the_paper_variant_gives_each_method_family_its_own_eta():
    """One eta of 0.1 for all diverged on the GPU (bench/results/paper_table_eta0.1): ASGD's eta is ten
    times the momentum methods' (the same step eta / (1 - beta)), K=64's a tenth of K=16's."""
    v = convergence.VARIANTS["paper"]
    assert [convergence.eta_for(v, "asgd", k) for k in (16, 64)] == [0.1, 0.01]
    for method in convergence.METHODS[1:]:
        assert [convergence.eta_for(v, method, k) for k in (16, 64)] == [0.01, 0.001]
    assert convergence.eta_for(convergence.VARIANTS["quick"], "ormo", 16) == convergence.VARIANTS["quick"]["lr"]


def test_the_cuda_smoke_check_passes_on_the_cpu(tmp_path):
    """bench/cuda_smoke.py's checks (batched gradients against one at a time in float64 and float32, a run's
    arrivals batched and one at a time) hold on the CPU, at a tiny size."""
    from bench import cuda_smoke

    result = cuda_smoke.main(["--device", "cpu", "--iterations", "12", "--workers", "4", "--batch-size", "8",
                              "--out", str(tmp_path / "smoke")])
    assert result["passed"] and len(result["checks"]) == 7
    assert result["gradients_relative_difference"]["float64"] < 1e-12
    assert "pass: same staleness_histogram" in (tmp_path / "smoke.md").read_text()
