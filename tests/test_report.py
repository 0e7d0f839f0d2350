"""ps-plot: the paper-format table and the figures from simulator runs."""

from __future__ import annotations

import statistics

import pytest

from server.config import RunConfig
from common.data import load_dataset
from report.cli import main as plot_main
from report.runs import find_runs
from report.tables import paper_table
from sim.simulator import ComputeTimeModel, Simulator


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    digits = load_dataset("digits")
    results = {}
    for algo in ("asgd", "ormo"):
        for het in (False, True):
            for seed in (0, 1):
                timing = ComputeTimeModel(slow_workers=1 if het else 0, slowdown=3)
                run = RunConfig(algo=algo, workers=2, dataset="digits", model="mlp", batch_size=64, lr=0.05,
                                epochs=2, seed=seed)
                out = root / f"{algo}-{'het' if het else 'hom'}-{seed}"
                s = Simulator(run, timing, dataset=digits, out_dir=out, eval_every=1.0).simulate().summary
                results[(algo, het, seed)] = s
    return root, results


def test_table_has_mean_and_std_over_seeds(sweep):
    root, results = sweep
    runs = find_runs([root])
    assert len(runs) == 8
    table = paper_table(runs, "test_accuracy")
    assert table.splitlines()[0] == "| method | 2 hom. | 2 het. |"
    accs = [100 * results[("ormo", True, s)]["final_test_accuracy"] for s in (0, 1)]
    expected = f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    ormo_row = next(line for line in table.splitlines() if line.startswith("| OrMo |"))
    assert ormo_row.split("|")[3].strip() == expected


def test_ps_plot_writes_figures_and_report(sweep, tmp_path, capsys):
    root, _ = sweep
    plot_main([str(root), "--out", str(tmp_path)])
    for name in ("test_accuracy_vs_epoch", "train_loss_vs_epoch", "test_accuracy_vs_time", "train_loss_vs_time"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    report = (tmp_path / "report.md").read_text()
    assert "| ASGD |" in report and "| OrMo |" in report
    assert "## Final training loss" in capsys.readouterr().out


def test_ps_plot_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        plot_main([str(tmp_path)])
    assert info.value.code == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
