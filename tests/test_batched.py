"""The batched simulator: every outstanding gradient in one vmapped call gives the run one at a time gives.

Exact where the arithmetic allows it: the arrivals (who, when, at which index) are identical, the batched
gradients equal the one-at-a-time ones to float64 rounding when computed in float64, and to float32 rounding
in float32, one gradient at a time.

Whole runs are compared in float64 (`float64_simulator`): a float32 run is not reproducible to a tolerance
that holds on every CPU. Batched matmuls and grouped convolutions sum in another order than one at a time, and
torch's vectorised float32 kernels round differently on AVX-512, AVX2 and scalar CPUs; once a ReLU input
within float32 rounding of zero switches, its unit's whole row of the gradient changes, and every later
(stale, momentum-carried) update carries that along. Measured, batched vs one at a time (||difference|| /
||w_T - w_0||): the MLP's 120 OrMo iterations 2e-7 on AVX-512 and 6e-5 on AVX2 (64 of 9,610 parameters off by
up to 4.4e-5: a switched ReLU); ResNet20's 30 iterations 1e-5 to 2.5e-3 on digits, and 2-46 % on CIFAR-10.
In float64 the same runs agree to 2e-15 (absolute, |w| <= 1.2; 2.3e-15 of their change) on every one of those
kernels (ATEN_CPU_CAPABILITY=avx512, avx2, default): a ReLU input within 1e-16 of zero does not occur, and
float64 rounding is not amplified much over runs this short (a relative perturbation of 1e-13 of w_0 ends
2e-13 to 2e-12 of the change apart). Their tolerance of 1e-12 is 500x what they show, and still far below what
one gradient computed at the wrong parameter or on the wrong mini-batch changes (eta times a gradient's
difference: 1e-4 and more).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ormo_ps.common.data import BatchStream, Draw, load_dataset
from ormo_ps.common.gradients import GradientComputer
from ormo_ps.common.metrics import read_metrics
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import ServerCore
from ormo_ps.sim.batched import BatchedGradients
from ormo_ps.sim.cli import main as sim_main
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator

BN_MODELS = ["strided-cnn", "resnet20"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tests compute on one thread: on a 2-core machine that other processes keep busy, torch's two
    OpenMP threads wait on each other (measured beside two busy loops: the ResNet20 runs of
    test_a_batched_resnet20_run_... took 56 s in float32 and 156 s in float64 on two threads, 0.4 s and 1.2 s
    on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class _Float64FlatModel:
    """What `GradientComputer` uses of a `FlatModel` (`module`, `load_`, `zero_grad_`, `params`, `grads`), for
    a float64 module: `FlatModel` holds float32 only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._trainable = [p for p in module.parameters() if p.requires_grad]

    def load_(self, vec: torch.Tensor) -> None:
        with torch.no_grad():
            for p, piece in zip(self._trainable, vec.split([p.numel() for p in self._trainable]), strict=True):
                p.copy_(piece.view_as(p))

    def zero_grad_(self) -> None:
        self.module.zero_grad(set_to_none=True)

    @property
    def params(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self._trainable])

    @property
    def grads(self) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in self._trainable])


def float64_simulator(run: RunConfig, timing: ComputeTimeModel, dataset, *, batched: bool, **kw) -> Simulator:
    """The simulator of `run` computing in float64 end to end (a test's way: the simulator is float32 only): its
    core holds w_0 in float64, and its gradients, one at a time (`GradientComputer`) or batched
    (`BatchedGradients`), are those of a float64 copy of the model whose inputs (the streams' float32
    mini-batches) are converted to float64 as they enter it. Everything else (arrivals, streams, computing
    ahead, the core's rules, the records) is the simulator's own. No final.pt: it holds float32 models."""
    sim = Simulator(run, timing, dataset=dataset, eval_every=None, final_eval=False, batched=batched, **kw)
    module = copy.deepcopy(sim.model.module).double()
    module.register_forward_pre_hook(lambda _module, args: tuple(a.double() for a in args))
    sim.core = ServerCore(sim.model.params.double(), run, sim.iters_per_epoch)
    sim.gradients = GradientComputer(_Float64FlatModel(module), run.weight_decay)
    if batched:
        sim.batched_gradients = BatchedGradients(module, run.weight_decay)
    sim.save = lambda out_dir: None
    return sim


def both(run: RunConfig, dataset, timing: ComputeTimeModel = HET, **kw):
    """The run one at a time and batched (same seed, same arrivals), in float64 (see the module's docstring)."""
    return [float64_simulator(run, timing, dataset, batched=b, **kw).simulate() for b in (False, True)]


# Whole float64 runs, batched vs one at a time: 2e-15 at most (|w| <= 1.2) on every CPU kernel measured.
F64_ATOL = 1e-12


def assert_same_params(one, batched) -> None:
    assert batched.params.dtype == one.params.dtype == torch.float64
    torch.testing.assert_close(batched.params, one.params, rtol=0, atol=F64_ATOL)


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
    assert_same_params(one, batched)
    assert batched.summary["final_train_loss"] == pytest.approx(one.summary["final_train_loss"], rel=1e-12)
    # Fewer, larger calls: each computes the gradients outstanding at the time.
    calls, computed = batched.summary["batched_calls"], batched.summary["gradients_computed"]
    assert computed >= 120 and calls < 120 / 2
    if batch_limit is None and algo == "ssgdm":
        assert calls == 120 // 8 and computed == 120  # one call per synchronous round


def test_a_batched_resnet20_run_applies_the_gradients_of_the_one_at_a_time_run(augmented):
    """ResNet20 (BatchNorm, residual connections, 0.27M parameters): the same arrivals and, in float64, the same
    parameters (in float32 its runs part by 1e-5 to 2.5e-3 of their change over these 30 iterations, depending
    on the CPU's kernels, and by percents on CIFAR-10: see the module's docstring)."""
    run = run_config(model="resnet20", iterations=30, lr=0.02)
    one, batched = both(run, augmented)
    assert_same_arrivals(one, batched)
    assert_same_params(one, batched)
    w0 = run.initial_model(augmented, "cpu").params.double()
    change = torch.linalg.vector_norm(one.params - w0)
    assert torch.linalg.vector_norm(batched.params - one.params) <= 1e-12 * change  # measured: 2.3e-15


def test_the_progress_records_book_each_workers_loss(augmented, tmp_path):
    run = run_config(model="strided-cnn")
    for batched in (False, True):  # in float64: the losses then agree to 1e-15 on every CPU
        float64_simulator(run, HET, augmented, out_dir=tmp_path / str(batched), log_every=10,
                          batched=batched).simulate()
    one, batched = ([r for r in read_metrics(tmp_path / str(b) / "metrics.jsonl") if r["event"] == "progress"]
                    for b in (False, True))
    assert [r["iteration"] for r in one] == [r["iteration"] for r in batched] == list(range(10, 121, 10))
    for a, b in zip(one, batched):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)
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
    from ormo_ps.server.checkpoint import load_checkpoint, save_checkpoint

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
