"""The simulator: reproducible, really computes gradients, models heterogeneity, writes its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ormo_ps.server.config import RunConfig
from ormo_ps.common.data import BatchStream, load_dataset
from ormo_ps.common.metrics import read_metrics
from ormo_ps.common.models import FlatModel, build_model
from ormo_ps.sim.cli import main as sim_main
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_run(**kw) -> RunConfig:
    base = dict(algo="ormo", workers=4, dataset="digits", model="mlp", batch_size=32, lr=0.05, iterations=60, seed=3)
    return RunConfig(**(base | kw))


def test_same_seed_gives_bit_identical_parameters_and_other_seed_does_not(digits):
    timing = ComputeTimeModel(jitter=0.5, slow_workers=1, slowdown=3)
    a = Simulator(small_run(), timing, dataset=digits, eval_every=None, final_eval=False).simulate()
    b = Simulator(small_run(), timing, dataset=digits, eval_every=None, final_eval=False).simulate()
    c = Simulator(small_run(seed=4), timing, dataset=digits, eval_every=None, final_eval=False).simulate()
    assert torch.equal(a.params, b.params)
    assert a.summary["staleness_histogram"] == b.summary["staleness_histogram"]
    assert not torch.equal(a.params, c.params)


def test_one_worker_ormo_is_momentum_sgd_on_the_workers_stream(digits):
    """K=1: every gradient is computed at the latest parameter, and OrMo is heavy-ball SGD."""
    run = small_run(workers=1, iterations=30, weight_decay=1e-3, lr=0.05, momentum=0.9, lr_milestones=())
    sim = Simulator(run, dataset=digits, eval_every=None, final_eval=False)
    result = sim.simulate()

    torch.manual_seed(run.seed)
    ref = FlatModel(build_model("mlp", digits.num_classes, digits.input_shape))
    opt = torch.optim.SGD(ref.module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    stream = BatchStream(digits, run.batch_size, run.worker_seed(0))
    for _ in range(30):
        x, y = next(stream)
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(ref.module(x), y).backward()
        opt.step()
    torch.testing.assert_close(result.params, ref.params, rtol=1e-4, atol=1e-5)


def test_heterogeneous_workers_send_fewer_gradients_and_make_staleness(digits):
    timing = ComputeTimeModel(jitter=0.0, slow_workers=2, slowdown=4)
    result = Simulator(small_run(workers=8, iterations=200), timing, dataset=digits, eval_every=None, final_eval=False).simulate()
    per_worker = result.summary["gradients_per_worker"]
    assert timing.slow_worker_ids(8) == frozenset({6, 7})
    assert all(per_worker[k] < per_worker[0] / 3 for k in (6, 7))
    assert sum(per_worker) == 200
    assert result.summary["staleness_max"] >= 4 * 8 - 8  # a slow worker misses about 4K updates


def test_synchronous_run_has_no_staleness(digits):
    result = Simulator(small_run(algo="ssgdm", iterations=40), dataset=digits, eval_every=None, final_eval=False).simulate()
    assert result.summary["staleness_max"] == 3  # within a round of K=4: delays 0, 1, 2, 3
    assert result.summary["gradients_per_worker"] == [10, 10, 10, 10]


def test_metrics_and_final_parameters_are_written(digits, tmp_path):
    run = small_run(iterations=None, epochs=2)
    result = Simulator(run, dataset=digits, out_dir=tmp_path, eval_every=1.0, log_every=10).simulate()
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "summary"
    assert events.count("eval") == 2
    progress = [r for r in records if r["event"] == "progress"]
    assert progress and {"iteration", "epoch", "time", "lr", "train_loss", "staleness_mean"} <= progress[0].keys()
    evals = [r for r in records if r["event"] == "eval"]
    assert {"test_accuracy", "test_loss", "train_loss", "epoch", "time"} <= evals[-1].keys()
    assert evals[-1]["test_accuracy"] == result.summary["final_test_accuracy"]
    saved = torch.load(tmp_path / "final.pt")
    assert torch.equal(saved["params"], result.params)
    assert saved["config"]["algo"] == "ormo"


def test_training_on_digits_is_far_above_chance(digits):
    run = small_run(iterations=None, epochs=10, batch_size=32, lr=0.05)
    result = Simulator(run, dataset=digits, eval_every=None).simulate()
    assert result.summary["final_test_accuracy"] > 0.85


def test_cli_runs_and_writes_summary(tmp_path, capsys):
    sim_main(["--iterations", "20", "--workers", "3", "--out", str(tmp_path), "-q", "--batch-size", "32"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 20 and summary["workers"] == 3
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--algo", "adam"], "'adam' is not one of"),
        (["--workers", "0"], "0 is not in the range x>=1"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar"),
        (["--momentum", "1.0"], "momentum"),
        (["--lr-milestones", "a,b"], "comma-separated"),
        (["--algo", "asgd", "--vanilla-sgd-step"], "ablation"),
        (["--slowdown", "0.5"], "slowdown"),
        (["--slow-workers", "5"], "slow_workers 5 is more than the 4 workers"),
        (["--slow-factor", "0.5"], "slow-factor"),
    ],
)
def test_cli_bad_flags_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        sim_main(args + ["--iterations", "1", "-q"])
    assert info.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_flags_read_environment_variables(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PS_ALGO", "smega2")
    monkeypatch.setenv("PS_WORKERS", "2")
    sim_main(["--iterations", "4", "--out", str(tmp_path), "-q", "--eval-every", "0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["algo"] == "smega2" and summary["workers"] == 2


@pytest.mark.data
@pytest.mark.slow
def test_resnet20_on_the_real_cifar10_images(tmp_path_factory):
    if not SHARED_DATA.exists():
        pytest.skip(f"CIFAR-10 images not found at {SHARED_DATA}")
    import tarfile

    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_DATA) as tar:
        tar.extractall(root, filter="data")
    data_dir = next(p.parent for p in root.rglob("train") if p.is_dir())
    run = RunConfig(algo="ormo", workers=16, model="resnet20", dataset="cifar10", data_dir=str(data_dir),
                    iterations=6, batch_size=32)
    result = Simulator(run, eval_every=None, final_eval=False).simulate()
    assert result.summary["iterations"] == 6
    assert torch.isfinite(result.params).all()


def test_ormo_trains_where_naive_asgdm_becomes_unstable(digits):
    """K=16 on digits at eta=0.02 (bench/results/stability.md has the sweep over eta and seeds)."""
    summaries = {}
    for algo in ("asgdm", "ormo"):
        run = RunConfig(algo=algo, workers=16, dataset="digits", model="mlp", batch_size=32, lr=0.02, epochs=20)
        summaries[algo] = Simulator(run, ComputeTimeModel(jitter=0.2), dataset=digits, eval_every=None,
                                    final_eval=True).simulate().summary
    # Its training loss leaves the untrained model's ln(10) far behind: reported as divergence, no final loss.
    assert summaries["asgdm"]["diverged"] and summaries["asgdm"]["final_train_loss"] is None
    assert not summaries["ormo"]["diverged"] and summaries["ormo"]["final_train_loss"] < 0.6


def test_a_finite_but_exploding_training_loss_is_reported_as_divergence(digits):
    """A training loss of 1e23 is not a result: more than ten times the first window's loss ends the run."""
    run = RunConfig(algo="asgd", workers=8, dataset="digits", model="mlp", batch_size=32, lr=0.5, iterations=300)
    said: list[str] = []
    sim = Simulator(run, ComputeTimeModel(jitter=0.2), dataset=digits, eval_every=None, log_every=10,
                    progress=said.append)
    summary = sim.simulate().summary
    assert summary["diverged"] and summary["final_test_accuracy"] is None
    assert any("more than 10x that of the first iterations" in line for line in said)  # finite, but exploding
    assert 10 <= summary["diverged_at_iteration"] < 300


@pytest.mark.parametrize("algo", ["ormo", "smega2", "shifted-momentum", "ssgdm", "dn", "ringmaster"])
def test_resuming_a_checkpoint_gives_the_same_parameters_as_never_stopping(digits, tmp_path, algo):
    from ormo_ps.server.checkpoint import load_checkpoint, save_checkpoint

    run = small_run(algo=algo, iterations=90, workers=3)
    timing = ComputeTimeModel(jitter=0.3, slow_workers=1, slowdown=3)
    straight = Simulator(run, timing, dataset=digits, eval_every=None, final_eval=False).simulate()

    first = Simulator(run, timing, dataset=digits, eval_every=None, final_eval=False)
    assert first.simulate(stop_at=37) is None
    save_checkpoint(tmp_path / "sim.ckpt", first.state_dict())
    second = Simulator(run, timing, dataset=digits, eval_every=None, final_eval=False)
    second.load_state_dict(load_checkpoint(tmp_path / "sim.ckpt"))
    resumed = second.simulate()
    assert torch.equal(resumed.params, straight.params)
    assert resumed.summary["staleness_histogram"] == straight.summary["staleness_histogram"]
    assert resumed.summary["gradients_per_worker"] == straight.summary["gradients_per_worker"]
