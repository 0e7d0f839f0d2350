"""ps-plot: the paper-format table and the figures from simulator runs."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

import pytest

from ormo_ps.common.data import load_dataset
from ormo_ps.common.metrics import MetricsWriter
from ormo_ps.report.cli import main as plot_main
from ormo_ps.report.plots import figure, too_short, write_figures
from ormo_ps.report.runs import Run, find_runs, load_run, variants
from ormo_ps.report.tables import paper_table
from ormo_ps.server.config import RunConfig
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator


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
    assert paper_table(find_runs([root / "ormo-het-0"]), "test_accuracy").splitlines()[2] \
        == f"| OrMo | {100 * results[('ormo', True, 0)]['final_test_accuracy']:.2f} (n=1) |"  # no "± 0.00"


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


# ----- grouping, curves and what a figure cannot show (runs as ps-plot reads them) ---------------------------
def fake_run(path: str, *, source: str = "sim", evals: list[tuple[float, float]] = ((1.0, 0.5),), seed: int = 0,
             finished: bool = True, slow=None, **config) -> Run:
    run_config = RunConfig(**({"seed": seed} | config)).to_dict()
    return Run(Path(path), run_config, source, slow,
               evals=[dict(iteration=int(10 * e), epoch=e, time=e, test_accuracy=a, train_loss=1 - a)
                      for e, a in evals],
               summary=dict(final_train_loss=0.1) if finished else {})


def test_runs_differing_in_more_than_the_seed_are_not_averaged():
    runs = [fake_run("a", seed=0), fake_run("b", seed=1), fake_run("c", source="server"),
            fake_run("d", lr=0.05), fake_run("e", seed=1, data_dir="/elsewhere")]
    table = paper_table(runs, "test_accuracy").splitlines()
    assert table[2:5] == ["| OrMo (lr 0.05, sim) | 50.00 (n=1) |", "| OrMo (lr 0.1, server) | 50.00 (n=1) |",
                          "| OrMo (lr 0.1, sim) | 50.00 ± 0.00 |"]  # a, b and e: seeds (the data's place aside)
    assert variants(runs)[runs[0]] == "lr 0.1, sim"


def test_seeds_are_averaged_where_each_has_points_not_on_the_first_runs_grid():
    one = fake_run("one", evals=[(30.0, 0.9)])  # evaluated at the end only
    many = fake_run("many", seed=1, evals=[(float(e), e / 40) for e in range(1, 31)])
    fig = figure([one, many], "test_accuracy_vs_epoch")
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [float(e) for e in range(1, 31)]
    assert line.get_ydata()[0] == 1 / 40 and line.get_ydata()[-1] == (0.9 + 30 / 40) / 2
    assert line.get_marker() == "o"


def test_a_single_evaluation_is_drawn_as_a_point_and_said():
    run = fake_run("short", evals=[(30.0, 0.97)])
    (line,) = figure([run], "test_accuracy_vs_epoch").axes[0].get_lines()
    assert line.get_marker() == "o" and len(line.get_xdata()) == 1  # a line of one point is only its marker
    assert too_short([run]) == ["short: one evaluation: a single point in the test-accuracy figures (evaluate "
                                "more often for a curve, e.g. --eval-every 1)"]


def test_a_failed_run_is_named_unfinished_without_a_matplotlib_warning(tmp_path):
    failed = fake_run("failed", evals=[], finished=False)
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_figures([failed], tmp_path, warn=said.append)  # once: "No artists with labels found ..."
    assert said == ["failed: no evaluation (it did not finish): not in the test-accuracy figures"]
    table = paper_table([failed], "test_accuracy")
    assert table.splitlines()[2] == "| OrMo | unfinished |"
    stopped = fake_run("stopped", evals=[(3.0, 0.9)], finished=False)  # evaluated, then stopped (SIGTERM)
    assert paper_table([stopped], "test_accuracy").splitlines()[2] == "| OrMo | 90.00 (n=1, unfinished) |"


def test_slow_workers_come_from_the_simulators_start_record_or_ps_launchs_launch_json(tmp_path):
    with MetricsWriter(tmp_path / "metrics.jsonl") as m:
        m.write("start", source="server", config=RunConfig(workers=8).to_dict())
    assert load_run(tmp_path / "metrics.jsonl").setting == "hom."
    (tmp_path / "launch.json").write_text(json.dumps({"workers": 8, "slow_workers": 2, "slowdown": 4.0}))
    run = load_run(tmp_path / "metrics.jsonl")
    assert (run.setting, run.slow, run.group) == ("het.", (2, 4.0), (8, "het."))


def test_runs_export_to_tensorboard(sweep, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, results = sweep
    plot_main([str(root / "ormo-het-0"), str(root / "asgd-hom-1"), "--out", str(tmp_path / "report"),
               "--tensorboard", str(tmp_path / "tb")])
    assert "TensorBoard event files of 2 run(s)" in capsys.readouterr().err
    events = EventAccumulator(str(tmp_path / "tb" / "ormo-het-0"))
    events.Reload()
    accuracy = events.Scalars("eval/test_accuracy")
    assert [e.step for e in accuracy][-1] == results[("ormo", True, 0)]["iterations"]
    assert accuracy[-1].value == pytest.approx(results[("ormo", True, 0)]["final_test_accuracy"])
    assert "train/train_loss" in events.Tags()["scalars"]


def test_a_resumed_run_draws_the_redone_part_once(tmp_path):
    """The records past a resumed server's checkpoint were lost with the crash and are written again."""
    import json

    from ormo_ps.report.runs import load_run

    config = {"algo": "ormo", "workers": 2, "seed": 0}
    lines = [dict(event="start", source="server", config=config)]
    lines += [dict(event="progress", iteration=i, epoch=i / 10, time=i, train_loss=1.0) for i in (10, 20, 30)]
    lines += [dict(event="eval", iteration=30, epoch=3.0, time=30, test_accuracy=0.5, test_loss=1.0)]
    lines += [dict(event="start", source="server", config=config, resumed_from_iteration=20)]
    lines += [dict(event="progress", iteration=i, epoch=i / 10, time=i, train_loss=0.9) for i in (30, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = load_run(tmp_path / "metrics.jsonl")
    assert [p["iteration"] for p in run.progress] == [10, 20, 30, 40] and run.progress[2]["train_loss"] == 0.9
    assert run.evals == []


def test_a_service_run_whose_workers_said_they_are_slow_is_heterogeneous(tmp_path):
    """A compose or Kubernetes run has no launch.json: the server's summary lists each worker's slowdown."""
    import json

    from ormo_ps.report.runs import load_run

    lines = [dict(event="start", source="server", config={"algo": "ormo", "workers": 4, "seed": 0}),
             dict(event="summary", iterations=10, worker_slowdowns=[1.0, 1.0, 1.0, 4.0])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = load_run(tmp_path / "metrics.jsonl")
    assert run.setting == "het." and run.slow == (1, 4.0)
