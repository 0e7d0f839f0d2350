"""The batched simulator: every outstanding gradient in one vmapped call gives the run one at a time gives.

Exact where the arithmetic allows it: the arrivals (who, when, at which index) are identical, the batched
gradients equal the one-at-a-time ones to float64 rounding when computed in float64, and whole float32 runs
agree to float32 rounding (ResNet20's float32 gradients are themselves only good to about 1e-3 of float64's:
a ReLU input within rounding of zero switches, so its runs get a tolerance of that size).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.data import BatchStream, Draw, load_dataset
from common.gradients import GradientComputer
from common.metrics import read_metrics
from server.config import RunConfig
from sim.batched import BatchedGradients
from sim.cli import main as sim_main
from sim.simulator import ComputeTimeModel, Simulator

BN_MODELS = ["strided-cnn", "resnet20"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def augmented(digits):
    """Digits with the CIFAR augmentation (crops of the zero-padded image, flips): image data with draws."""
    return dataclasses.replace(digits, augment=True)


def run_config(**kw) -> RunConfig:
    base = dict(algo="ormo", workers=8, dataset="digits", model="mlp", batch_size=16, lr=0.05, iterations=120,
                seed=3, warmup_epochs=0.0, weight_decay=1e-3)
    return RunConfig(**(base | kw))


HET = ComputeTimeModel(jitter=0.3, slow_workers=2, slowdown=4)


def both(run: RunConfig, dataset, timing: ComputeTimeModel = HET, **kw):
    """The run one at a time and batched (same seed, same arrivals)."""
    return [Simulator(run, timing, dataset=dataset, eval_every=None, final_eval=False, batched=b, **kw).simulate()
            for b in (False, True)]


def assert_same_arrivals(one, batched) -> None:
    for key in ("iterations", "staleness_histogram", "gradients_per_worker", "time"):
        assert one.summary[key] == batched.summary[key], key


# ------------------------------------------------------------------------------------------------- the data


def test_draws_taken_together_are_the_batches_taken_alone(augmented):
    alone = [BatchStream(augmented, 16, seed) for seed in range(3)]
    together = [BatchStream(augmented, 16, seed) for seed in range(3)]
    for _ in range(200):  # past several passes: new permutations, crops and flips
        expected = [next(s) for s in alone]
        x, y = together[0].take(Draw.cat([s.draw() for s in together]))
        assert torch.equal(x, torch.cat([e[0] for e in expected]))
        assert torch.equal(y, torch.cat([e[1] for e in expected]))
    assert [s.state_dict()["position"] for s in alone] == [s.state_dict()["position"] for s in together]


# -------------------------------------------------------------------------------------------- the gradients


def _stacked_inputs(dataset, model: str, n: int, batch: int, dtype: torch.dtype):
    run = run_config(model=model, workers=n, batch_size=batch)
    flat = run.initial_model(dataset, "cpu")
    torch.manual_seed(5)  # n different parameter vectors around w_0, as the workers of a run hold
    params = flat.params.detach() + 0.05 * flat.params.detach().abs().mean() * torch.randn(n, flat.numel)
    streams = [BatchStream(dataset, batch, k) for k in range(n)]
    x, y = streams[0].take(Draw.cat([s.draw() for s in streams]))
    return flat, params.to(dtype), x.to(dtype).view(n, batch, *x.shape[1:]), y.view(n, batch)


@pytest.mark.parametrize("model", ["mlp", *BN_MODELS])
def test_batched_gradients_are_the_one_at_a_time_gradients_in_float64(augmented, model):
    """In float64 the rounding differences vanish: what remains is what is computed, and it is the same (each
    worker's own parameters, batch, BatchNorm batch statistics, weight decay and loss)."""
    flat, params, x, y = _stacked_inputs(augmented, model, 4, 16, torch.float64)
    batched = BatchedGradients(copy.deepcopy(flat.module).double(), weight_decay=1e-3)
    grads, losses, finite = batched.compute(params, x, y)

    module = copy.deepcopy(flat.module).double().train()  # what GradientComputer does, in float64
    for i in range(len(params)):
        nn.utils.vector_to_parameters(params[i], module.parameters())
        module.zero_grad()
        loss = F.cross_entropy(module(x[i]), y[i])
        loss.backward()
        expected = torch.cat([p.grad.flatten() for p in module.parameters()]) + 1e-3 * params[i]
        torch.testing.assert_close(grads[i], expected, rtol=1e-10, atol=1e-12)
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-12)
    assert finite.all()


@pytest.mark.parametrize("model,rtol", [("mlp", 1e-5), ("strided-cnn", 1e-5), ("resnet20", 1e-2)])
def test_batched_gradients_match_the_gradient_computer_in_float32(augmented, model, rtol):
    flat, params, x, y = _stacked_inputs(augmented, model, 4, 16, torch.float32)
    grads, losses, _ = BatchedGradients(flat.module, weight_decay=1e-3).compute(params, x, y)
    computer = GradientComputer(flat, 1e-3)
    for i in range(len(params)):
        expected, loss = computer.compute(params[i], x[i], y[i])
        assert torch.linalg.vector_norm(grads[i] - expected) <= rtol * torch.linalg.vector_norm(expected)
        assert losses[i].item() == pytest.approx(loss, rel=1e-5)


def test_a_model_vmap_cannot_batch_is_named_with_the_way_out(augmented):
    module = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))  # dropout draws at random
    with pytest.raises(RuntimeError, match="--one-at-a-time"):
        BatchedGradients(module, 0.0).compute(torch.zeros(2, 650), torch.zeros(2, 4, 1, 8, 8),
                                              torch.zeros(2, 4, dtype=torch.int64))


# -------------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("model,algo,batch_limit", [
    ("mlp", "ormo", None),           # asynchronous, a quarter of the workers 4x slower
    ("mlp", "ssgdm", None),          # synchronous rounds: all K computed together, the next round after
    ("strided-cnn", "ormo", 3),      # BatchNorm, augmentation, at most 3 workers per call
    ("strided-cnn", "smega2", None),  # the worker is sent an estimate, not w
])
def test_a_batched_run_applies_the_gradients_of_the_one_at_a_time_run(augmented, model, algo, batch_limit):
    one, batched = both(run_config(model=model, algo=algo), augmented, batch_limit=batch_limit)
    assert_same_arrivals(one, batched)
    torch.testing.assert_close(batched.params, one.params, rtol=1e-5, atol=1e-6)
    assert batched.summary["final_train_loss"] == pytest.approx(one.summary["final_train_loss"], rel=1e-5)
    # Fewer, larger calls: each computes the gradients outstanding at the time.
    calls, computed = batched.summary["batched_calls"], batched.summary["gradients_computed"]
    assert computed >= 120 and calls < 120 / 2
    if batch_limit is None and algo == "ssgdm":
        assert calls == 120 // 8 and computed == 120  # one call per synchronous round


def test_a_batched_resnet20_run_agrees_to_the_accuracy_of_float32(augmented):
    """The same arrivals; the parameters' change from w_0 within 1 % (float32 ResNet20 gradients differ from
    float64 ones by up to about 1e-3, one at a time as batched, and 30 stale updates carry that along)."""
    run = run_config(model="resnet20", iterations=30, lr=0.02)
    one, batched = both(run, augmented)
    assert_same_arrivals(one, batched)
    w0 = run.initial_model(augmented, "cpu").params
    change = torch.linalg.vector_norm(one.params - w0)
    assert torch.linalg.vector_norm(batched.params - one.params) <= 0.01 * change


def test_the_progress_records_book_each_workers_loss(augmented, tmp_path):
    run = run_config(model="strided-cnn")
    for batched in (False, True):
        Simulator(run, HET, dataset=augmented, out_dir=tmp_path / str(batched), eval_every=None, final_eval=False,
                  log_every=10, batched=batched).simulate()
    one, batched = ([r for r in read_metrics(tmp_path / str(b) / "metrics.jsonl") if r["event"] == "progress"]
                    for b in (False, True))
    assert [r["iteration"] for r in one] == [r["iteration"] for r in batched] == list(range(10, 121, 10))
    for a, b in zip(one, batched):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert (b["staleness_mean"], b["staleness_max"], b["time"]) == (a["staleness_mean"], a["staleness_max"],
                                                                      a["time"])
    assert read_metrics(tmp_path / "True" / "metrics.jsonl")[0]["gradients"] == "batched"


@pytest.mark.parametrize("lr,why", [(1e3, "more than 10x"), (1e12, "non-finite loss or gradient")])
def test_divergence_is_detected_at_the_same_iteration(digits, lr, why):
    run = run_config(algo="asgd", lr=lr, iterations=300, batch_size=32, weight_decay=1e-4)
    said: dict[bool, list[str]] = {False: [], True: []}
    summaries = [Simulator(run, ComputeTimeModel(jitter=0.2), dataset=digits, eval_every=None, log_every=10,
                           progress=said[b].append, batched=b).simulate().summary for b in (False, True)]
    assert summaries[0]["diverged"] and summaries[1]["diverged"]
    assert summaries[0]["diverged_at_iteration"] == summaries[1]["diverged_at_iteration"] < 300
    assert [line for line in said[True] if "diverged" in line] == [line for line in said[False] if "diverged" in line]
    assert any(why in line for line in said[True])


def test_a_paused_batched_run_keeps_its_gradients_computed_ahead(augmented, tmp_path):
    """A checkpoint holds the gradients computed ahead of their arrivals (their mini-batches are drawn): the
    resumed run is the straight one bit for bit."""
    from server.checkpoint import load_checkpoint, save_checkpoint

    run = run_config(model="strided-cnn", iterations=90)
    straight = Simulator(run, HET, dataset=augmented, eval_every=None, final_eval=False, batched=True).simulate()
    first = Simulator(run, HET, dataset=augmented, eval_every=None, final_eval=False, batched=True)
    assert first.simulate(stop_at=37) is None
    assert first.computed  # some gradients wait for their arrivals
    save_checkpoint(tmp_path / "sim.ckpt", first.state_dict())
    second = Simulator(run, HET, dataset=augmented, eval_every=None, final_eval=False, batched=True)
    second.load_state_dict(load_checkpoint(tmp_path / "sim.ckpt"))
    resumed = second.simulate()
    assert torch.equal(resumed.params, straight.params)
    assert resumed.summary["batched_calls"] == straight.summary["batched_calls"]


def test_the_cpu_default_is_one_at_a_time_and_the_flags_choose(tmp_path, capsys):
    args = ["--iterations", "20", "--workers", "4", "--batch-size", "16", "-q", "--eval-every", "0"]
    summaries = {}
    for flag in ("", "--batched", "--one-at-a-time"):
        sim_main(args + ["--out", str(tmp_path / (flag or "default"))] + ([flag] if flag else []))
        summaries[flag] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "batched_calls" not in summaries[""] and "batched_calls" not in summaries["--one-at-a-time"]
    assert summaries["--batched"]["batched_calls"] >= 1
    assert summaries["--batched"]["final_test_accuracy"] == pytest.approx(summaries[""]["final_test_accuracy"],
                                                                          abs=1 / 297)
