"""Bring your own model (#16): models and data sets by import path in every command, the RemoteOptimizer
(the user's own loop) against a real server, the parameter-layout check, a run whose model a client brings,
and the example in examples/byom/ (four client processes against ps-server, and ps-sim)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import grpc
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ormo_ps.common import layout as layouts
from ormo_ps.common.data import from_torch_datasets, load_dataset
from ormo_ps.common.models import MLP, build_model
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.launcher.cli import cli as launch_cli
from ormo_ps.launcher.cli import main as launch_main
from ormo_ps import RemoteOptimizer, ServerError
from ormo_ps.server.cli import ServeOptions, build_service
from ormo_ps.server.cli import cli as server_cli
from ormo_ps.server.cli import main as server_main
from ormo_ps.server.config import RunConfig
from ormo_ps.server.stream import END_STREAM, Rejected
from ormo_ps.sim.cli import cli as sim_cli
from ormo_ps.sim.cli import main as sim_main
from ormo_ps.sim.simulator import Simulator
from tests.logged_process import LoggedProcess
from tests.test_service import assert_aborted, assert_same_state, snapshot, start_run
from ormo_ps.worker.cli import cli as worker_cli
from ormo_ps.worker.client import Worker, WorkerError, WorkerOptions
from ormo_ps.worker.evaluator import cli as eval_cli
from ormo_ps.worker.evaluator import run_evaluator

if TYPE_CHECKING:
    from conftest import LiveServer, RawWorker

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = "examples.byom.model:build"
EXAMPLE_DATA = "examples.byom.data:load"
# What the example reaches (README, "Your own model"): about 0.97-0.98 on its 450 test digits.
EXAMPLE_ACCURACY = 0.94

USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ormo_ps import Dataset


def build(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def no_arguments():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def not_a_module(num_classes, input_shape):
    return "a model"


def three_arguments(a, b, c):
    return nn.Linear(1, 1)


NOT_CALLABLE = 42


def pair(data_dir):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])


def own_type():
    x = torch.zeros(4, 2)
    return Dataset("mine", x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([1, 0, 1, 0]), num_classes=2,
                   input_shape=(2,), mean=(0.0,), std=(1.0,), augment=False)


def not_a_dataset(data_dir):
    return [1, 2, 3]


def float_labels():
    x = torch.zeros(4, 2)
    return TensorDataset(x, torch.zeros(4)), TensorDataset(x, torch.zeros(4))
'''


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory) -> Iterator[Path]:
    """`byom_user` (a user's models and data sets) and `byom_broken` (a module whose import fails) on sys.path."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "byom_user.py").write_text(USER_MODULE)
    (folder / "byom_broken.py").write_text("import a_dependency_that_is_not_installed\n")
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        for name in ("byom_user", "byom_broken"):
            sys.modules.pop(name, None)


def digits_mlp(**kw: Any) -> RunConfig:
    return RunConfig(**(dict(algo="ormo", workers=2, dataset="digits", model="mlp", batch_size=32) | kw))


# ----- import paths beside the names -----------------------------------------------------------------
def test_every_command_takes_import_paths_beside_the_names(user_modules):
    run = RunConfig(model="byom_user:build", dataset="byom_user:pair")
    assert RunConfig.from_dict(run.to_dict()) == run
    assert run.to_flags() == ["--model", "byom_user:build", "--dataset", "byom_user:pair"]
    for command in (server_cli, sim_cli, launch_cli):
        params = command.make_context("ps", run.to_flags()).params
        assert (params["model"], params["dataset"]) == ("byom_user:build", "byom_user:pair")
    for command in (worker_cli, eval_cli):  # these build what the server names, or what they are told
        params = command.make_context("ps", ["--model", EXAMPLE_MODEL, "--dataset", EXAMPLE_DATA]).params
        assert (params["model"], params["dataset"]) == (EXAMPLE_MODEL, EXAMPLE_DATA)
    assert server_cli.make_context("ps", ["--model", "mlp"]).params["model"] == "mlp"  # the names still work


BAD_SPECS = [
    ("model", "byom_no_such_module:build", "model 'byom_no_such_module:build': no module named 'byom_no_such_module'"),
    ("model", "byom_user:missing", "model 'byom_user:missing': module byom_user has no attribute 'missing'"),
    ("model", "byom_user:NOT_CALLABLE", "model 'byom_user:NOT_CALLABLE' is a int, not a callable"),
    ("model", "byom_broken:build", "importing byom_broken failed: No module named 'a_dependency_that_is_not_installed'"),
    ("model", "mpl", "unknown model 'mpl'; valid names: mlp, resnet110"),
    ("model", ":build", "an import path is MODULE:ATTRIBUTE"),
    ("dataset", "byom_user:missing", "dataset 'byom_user:missing': module byom_user has no attribute 'missing'"),
    ("dataset", "cifar", "unknown dataset 'cifar'; valid names: cifar10, cifar100, digits, synthetic, or an import"),
]


@pytest.mark.parametrize(("field", "spec", "message"), BAD_SPECS, ids=[b[1] for b in BAD_SPECS])
def test_a_bad_import_path_is_a_clear_error_in_every_command(user_modules, field, spec, message):
    with pytest.raises(ValueError) as info:
        RunConfig(**({field: spec, "model": "mlp"} if field == "dataset" else {field: spec}))
    assert message in str(info.value)
    for command in (server_cli, sim_cli, launch_cli, worker_cli, eval_cli):
        with pytest.raises(click.BadParameter) as info:
            command.make_context("ps", [f"--{field}", spec])
        assert message in info.value.format_message()


def test_what_an_import_path_returns_is_checked(user_modules, capsys):
    assert isinstance(build_model("byom_user:no_arguments", 10, (1, 8, 8)), nn.Module)  # or a callable of nothing
    with pytest.raises(ValueError, match=r"model 'byom_user:not_a_module' returned a str; expected a torch.nn.Module"):
        build_model("byom_user:not_a_module", 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"must take \(num_classes, input_shape\), or nothing; its signature is "):
        build_model("byom_user:three_arguments", 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"returned a list; expected a ormo_ps.common.data.Dataset \(ormo_ps.Dataset\) or a "):
        load_dataset("byom_user:not_a_dataset")
    with pytest.raises(ValueError, match="labels must be integer class indexes"):
        load_dataset("byom_user:float_labels")
    # ps-server reports the wrong return type when it builds the model, before it listens.
    with pytest.raises(SystemExit) as exit_info:
        server_main(["--model", "byom_user:not_a_module", "--bind", "127.0.0.1:0", "--out", str(user_modules / "o")])
    assert exit_info.value.code == 1
    assert "returned a str; expected a torch.nn.Module" in capsys.readouterr().err


def test_a_data_set_by_import_path_is_read_as_it_is(user_modules):
    pair = load_dataset("byom_user:pair")
    assert (pair.name, pair.num_train, pair.num_test, pair.num_classes, pair.input_shape) == (
        "byom_user:pair", 100, 20, 2, (3,))
    assert torch.equal(pair.normalize(pair.train_x), pair.train_x)  # the user's own values: no normalisation added
    assert load_dataset("byom_user:own_type").name == "mine"  # the project's type passes as it is
    train, test = torch.utils.data.random_split(TensorDataset(torch.zeros(10, 1), torch.arange(10) % 3), [6, 4])
    assert from_torch_datasets("split", train, test, num_classes=5).num_classes == 5
    train.classes = ["a", "b", "c", "d"]  # torchvision's convention
    assert from_torch_datasets("split", train, test).num_classes == 4


# ----- the parameter layout --------------------------------------------------------------------------
def state_and_books(server: LiveServer) -> dict[str, Any]:
    """The run's state (w, iteration, rule) and everything admission changes, copied on the server's loop."""
    books = server.on_loop(lambda: (dict(server.service.connections), set(server.service.ever_assigned),
                                    server.service.layout, server.service.started))
    return snapshot(server) | {"books": books}


def same_numel_other_names() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def other_shapes() -> nn.Module:
    return MLP((1, 8, 8), 10, hidden=64)


def one_tensor_frozen() -> nn.Module:
    model = MLP((1, 8, 8), 10)
    model.fc2.bias.requires_grad_(False)
    return model


MISMATCHES = [
    (same_numel_other_names, "parameter 0 is 1.weight [128, 64] float32 here, fc1.weight [128, 64] float32 in the run"),
    (other_shapes, "parameter 0 is fc1.weight [64, 64] float32 here, fc1.weight [128, 64] float32 in the run"),
    (one_tensor_frozen, "3 parameter tensors here, 4 in the run (the first missing one: fc2.bias [10] float32)"),
]


@pytest.mark.parametrize(("make", "message"), MISMATCHES, ids=[m[0].__name__ for m in MISMATCHES])
def test_a_client_whose_model_is_not_the_runs_is_refused_and_changes_nothing(server: LiveServer, raw_workers,
                                                                             make, message):
    before = state_and_books(server)
    with pytest.raises(ServerError) as info:
        RemoteOptimizer(make(), server=server.target)
    assert info.value.code == "FAILED_PRECONDITION"
    assert "the client's model does not match the run's parameter layout (model mlp: 4 tensors, 9610 values)" in str(
        info.value)
    assert message in str(info.value)
    after = state_and_books(server)
    assert_same_state(before, after)
    assert before["books"] == after["books"]
    start_run(raw_workers)  # the refused client took no slot: the run starts with ids 0 and 1


def test_a_worker_declaring_another_layout_in_ready_is_refused_and_changes_nothing(server: LiveServer, raw_workers):
    mlp_layout = layouts.layout_of(build_model("mlp", 10, (1, 8, 8)))
    before = state_and_books(server)
    w: RawWorker = raw_workers()
    welcome = w.register()
    assert layouts.from_pb(welcome.layout) == mlp_layout and not welcome.parameters_wanted
    w.send(pb.WorkerMessage(ready=pb.Ready(layout=layouts.to_pb(layouts.layout_of(other_shapes())))))
    assert_aborted(w, grpc.StatusCode.FAILED_PRECONDITION, "parameter 0 is fc1.weight [64, 64] float32 here")
    after = state_and_books(server)
    assert_same_state(before, after)
    assert before["books"] == after["books"]
    # ps-worker itself: told to build another model, it is refused at Ready and stops (no retrying).
    with pytest.raises(WorkerError) as info:
        asyncio.run(Worker(WorkerOptions(server=server.target, model="small-cnn", server_timeout=10)).run())
    assert info.value.code == "FAILED_PRECONDITION"
    a, b = start_run(raw_workers)  # a Ready with the run's own layout is taken as ever
    assert server.on_loop(lambda: server.service.started)


# ----- the RemoteOptimizer in the user's loop ------------------------------------------------------------
def flat(model: nn.Module, of: Callable[[torch.Tensor], torch.Tensor] = lambda p: p) -> torch.Tensor:
    return torch.cat([of(p).detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("weight_decay,chunk_mib", [(None, 4.0), (0.0, 4.0), (None, 0.01)],
                         ids=["the run's", "none", "the run's, in 10 KiB chunks"])
def test_a_step_sends_the_gradient_plus_weight_decay_and_loads_the_answer(start_live_server, weight_decay, chunk_mib):
    run = RunConfig(algo="asgd", workers=1, dataset="digits", model="mlp", batch_size=32, lr=0.1,
                    weight_decay=0.01, iterations=1000)
    # chunk_mib 0.01: the MLP's 38 kB tensors travel as four chunks each way (tests/test_chunks.py has the rest)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, chunk_mib=chunk_mib)
    try:
        model = MLP((1, 8, 8), 10)
        with RemoteOptimizer(model, server=live.target, weight_decay=weight_decay) as opt:
            w0 = live.on_loop(lambda: live.service.core.w.clone())
            assert torch.equal(flat(model), w0) and opt.iteration == 0  # the run's w_0, not the model's own init
            assert opt._client._sender.chunk_bytes == round(chunk_mib * 2**20)  # it reads and sends chunks
            data = load_dataset("digits")
            loss = F.cross_entropy(model(data.normalize(data.train_x[:32])), data.train_y[:32])
            opt.zero_grad()
            loss.backward()
            grad = flat(model, lambda p: p.grad)
            opt.step(loss=loss)
            decayed = grad.clone().add_(w0, alpha=0.01 if weight_decay is None else weight_decay)
            assert torch.equal(flat(model), w0.clone().add_(decayed, alpha=-0.1))  # ASGD: w -= eta * (g + wd * w)
            assert opt.iteration == 1 and live.on_loop(lambda: live.service.core.iteration) == 1
            # A non-finite gradient is refused before it is sent: nothing changes, the next step goes through.
            next(model.parameters()).grad[0, 0] = float("nan")
            with pytest.raises(ValueError, match="gradient is not finite: 1 NaN .* nothing was sent"):
                opt.step()
            assert opt.iteration == 1 and live.on_loop(lambda: live.service.counters.gradients_rejected) == 0
            opt.zero_grad()
            opt.step()
            assert opt.iteration == 2
    finally:
        stop()


def user_loop(opt: RemoteOptimizer, model: nn.Module, seed: int, steps: int | None = None) -> int:
    """A user's loop over their own sampling of digits: until the run is done (or `steps` steps)."""
    data = load_dataset("digits")
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while not opt.done and (steps is None or done < steps):
        index = torch.randint(0, data.num_train, (32,), generator=generator)
        loss = F.cross_entropy(model(data.normalize(data.train_x[index])), data.train_y[index])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
        done += 1
    return done


def in_threads(*targets: Callable[[], Any]) -> list[Any]:
    """Run each target in its own thread (each a client with its own stream); their results or errors."""
    results: list[Any] = [None] * len(targets)

    def run(i: int) -> None:
        try:
            results[i] = targets[i]()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_clients_train_in_their_own_loops_and_end_with_the_final_parameters(start_live_server):
    run = digits_mlp(lr=0.05, epochs=4)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=30.0)
    try:
        def client(seed: int) -> tuple[RemoteOptimizer, nn.Module, int]:
            torch.manual_seed(seed)
            model = MLP((1, 8, 8), 10)
            opt = RemoteOptimizer(model, server=live.target, name=f"client-{seed}")
            return opt, model, user_loop(opt, model, seed)

        clients = in_threads(lambda: client(1), lambda: client(2))
        total = live.on_loop(lambda: live.service.core.total_iterations)
        final = live.on_loop(lambda: live.service.core.current_params().clone())
        data = load_dataset("digits")
        for opt, model, steps in clients:
            assert opt.done and opt.stop_reason == "STOP_REASON_DONE" and opt.iteration == total
            assert torch.equal(flat(model), final)  # the run's final parameters, fetched after the Stop
            with torch.no_grad():
                accuracy = (model(data.normalize(data.test_x)).argmax(1) == data.test_y).float().mean()
            assert accuracy > 0.9
            opt.step()  # after the end: nothing
        assert sum(steps for _, _, steps in clients) >= total
        assert sorted(opt.worker_id for opt, _, _ in clients) == [0, 1]
        assert live.on_loop(lambda: live.service.recorder.last_epoch_train_loss) < 0.5  # the users' losses
        # The clients' fetches of the final parameters do not end the server's wait for its evaluator.
        assert live.on_loop(lambda: live.service.finished.is_set() and not live.service.final_fetched.is_set())
    finally:
        stop()


def test_a_client_reconnects_when_its_stream_is_cut_and_says_so_when_the_server_is_gone(start_live_server):
    run = RunConfig(algo="asgd", workers=1, dataset="digits", model="mlp", batch_size=32, lr=0.05, iterations=1000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0)
    model = MLP((1, 8, 8), 10)
    try:
        opt = RemoteOptimizer(model, server=live.target, server_timeout=2)
        user_loop(opt, model, 1, steps=3)

        def cut() -> None:  # the server ends the client's stream, as when a link breaks
            conn = live.service.connections[0]
            conn.error = Rejected(grpc.StatusCode.UNAVAILABLE, "cut by the test")
            conn.send(END_STREAM)

        live.on_loop(cut)
        user_loop(opt, model, 2, steps=5)
        assert opt.worker_id == 0 and opt.iteration >= 7  # back with its id; at most the gradient in flight lost
        assert torch.equal(flat(model), live.on_loop(lambda: live.service.core.w.clone()))
    finally:
        stop()
    for _ in range(2):  # the server is gone: the next step says so, and so does every later one
        with pytest.raises(ServerError, match=r"the server 127.0.0.1:\d+ stopped before the run's end: unreachable"):
            opt.step()


# ----- a run whose model a client brings -------------------------------------------------------------------
def test_a_server_that_names_no_model_takes_the_first_clients_layout_and_parameters(start_live_server, tmp_path):
    run = digits_mlp(model="client", lr=0.05, iterations=100_000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, out=str(tmp_path))
    try:
        assert live.on_loop(lambda: (live.service.layout, live.service.core.has_parameters)) == (None, False)
        with pytest.raises(ValueError, match="the server names no model .*give ps-eval --model"):
            run_evaluator(live.target, server_timeout=5)
        torch.manual_seed(1)
        first = MLP((1, 8, 8), 10)
        w_first = flat(first).clone()

        def second_client() -> tuple[RemoteOptimizer, nn.Module]:
            while not live.on_loop(lambda: live.service.core.has_parameters):  # the first client's Ready came
                threading.Event().wait(0.05)
            with pytest.raises(ServerError, match=r"parameter 0 is fc1.weight \[64, 64\] float32 here"):
                RemoteOptimizer(other_shapes(), server=live.target)
            torch.manual_seed(2)
            model = MLP((1, 8, 8), 10)
            return RemoteOptimizer(model, server=live.target), model

        # The first client's constructor returns once the second is ready too (the run waits for K = 2).
        opt1, (opt2, second) = in_threads(lambda: RemoteOptimizer(first, server=live.target), second_client)
        assert torch.equal(flat(first), w_first) and torch.equal(flat(second), w_first)  # w_0: the first's own
        assert live.on_loop(lambda: live.service.layout) == opt1.layout == opt2.layout
        in_threads(lambda: user_loop(opt1, first, 1, steps=20), lambda: user_loop(opt2, second, 2, steps=20))
        opt1.close()
        opt2.close()
        live.call(live.service.checkpoint())
        w_now = live.on_loop(lambda: live.service.core.w.clone())
        assert live.on_loop(lambda: live.service.core.iteration) >= 38  # at most one gradient each lost in flight
    finally:
        stop()
    # A checkpoint keeps the layout and the parameters: the run resumes without a client.
    resumed = build_service(run, ServeOptions(out=None, resume=str(tmp_path)))
    assert resumed.layout == opt1.layout and torch.equal(resumed.core.w, w_now)


def test_a_ps_worker_brings_its_model_to_a_server_that_names_none(start_live_server):
    """One ps-worker told --model mlp against ps-server --model client: its layout and w_0 (drawn from the run's
    seed) become the run's, which is then the run ps-server --model mlp is: the simulator's, bit for bit."""
    args = dict(algo="ormo", workers=1, dataset="digits", batch_size=32, lr=0.05, iterations=30, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        live, stop = start_live_server(RunConfig(model="client", **args), bind="127.0.0.1:0", linger=5.0)
        try:
            result = asyncio.run(Worker(WorkerOptions(server=live.target, model="mlp")).run())
            served, layout = live.on_loop(lambda: (live.service.core.w.clone(), live.service.layout))
        finally:
            stop()
        simulated = Simulator(RunConfig(model="mlp", **args), eval_every=None, final_eval=False).simulate().params
    finally:
        torch.set_num_threads(threads)
    assert (result.stop_reason, result.gradients_sent) == ("STOP_REASON_DONE", 30)
    assert layout == layouts.layout_of(build_model("mlp", 10, (1, 8, 8)))
    assert torch.equal(served, simulated)


# ----- the commands that need a model ------------------------------------------------------------------------
def test_ps_sim_and_ps_launch_need_a_model(capsys):
    for main in (sim_main, launch_main):
        with pytest.raises(SystemExit) as info:
            main(["--model", "client", "--iterations", "5"])
        assert info.value.code == 2
        assert "--model client" in capsys.readouterr().err


def test_the_example_model_in_ps_sim_by_import_path(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim_main(["--model", EXAMPLE_MODEL, "--dataset", EXAMPLE_DATA, "--workers", "4", "--batch-size", "32",
                  "--lr", "0.05", "--epochs", "15", "--eval-every", "0", "--out", str(tmp_path), "-q"])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 15 * (1347 // 32)
    assert summary["final_test_accuracy"] >= EXAMPLE_ACCURACY  # BatchNorm statistics recomputed at w_T
    final = torch.load(tmp_path / "final.pt")
    assert any(k.endswith("running_mean") for k in final["model_state"])


# ----- the example, as its README runs it ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("server_model", [EXAMPLE_MODEL, "client"])
def test_the_example_trains_four_client_processes_against_ps_server(tmp_path, server_model):
    """ps-server (the example's model by import path, or none: the first client's), four clients running
    examples/byom/train.py (RemoteOptimizer, their own DataLoader and loop) and ps-eval, with a token."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "PS_TOKEN": secrets.token_hex(16),
                        "OMP_NUM_THREADS": "1"}
    processes: list[LoggedProcess] = []

    def start(name: str, *argv: str) -> LoggedProcess:
        processes.append(LoggedProcess(name, [sys.executable, "-m", *argv], env, ROOT, tmp_path / f"{name}.log"))
        return processes[-1]

    try:
        server = start("server", "ormo_ps.server.cli", "--model", server_model, "--dataset", EXAMPLE_DATA, "--workers", "4",
                       "--batch-size", "32", "--lr", "0.05", "--epochs", "15", "--bind", "127.0.0.1:0",
                       "--out", str(tmp_path), "--linger", "60")
        port = server.wait_for(r"ps-server listening on \S+:(\d+)", timeout=120).group(1)
        address = f"127.0.0.1:{port}"
        clients = [start(f"client-{k}", "examples.byom.train", "--server", address, "--seed", str(k))
                   for k in range(4)]
        evaluator = start("eval", "ormo_ps.worker.evaluator", "--server", address, "--out", str(tmp_path),
                          "--eval-every", "0", "--model", EXAMPLE_MODEL, "--dataset", EXAMPLE_DATA)
        for p in [*clients, evaluator, server]:
            assert p.proc.wait(300) == 0, p.output()[-3000:]
    finally:
        for p in processes:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)
    results = [json.loads(c.find_all(r"^\{.*\}$")[-1].group(0)) for c in clients]
    assert sorted(r["worker"] for r in results) == [0, 1, 2, 3]
    assert all(r["iteration"] == 15 * (1347 // 32) for r in results)
    assert min(r["test_accuracy"] for r in results) >= EXAMPLE_ACCURACY, results
    final_eval = json.loads(evaluator.find_all(r"^\{.*\}$")[-1].group(0))
    assert final_eval["test_accuracy"] >= EXAMPLE_ACCURACY


# ----- a client-brought model of any size ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet20", "tests.big_models:wide"])
def test_a_client_model_of_any_size_starts_trains_and_is_evaluated(start_live_server, tmp_path, model_name):
    """The issue: with --model client the server's receive limit came from its empty model (1 MiB), so the
    first client's Ready, carrying w_0 whole, was refused (`Received message larger than max (4915261 vs.
    1048576)` for ResNet20's 1.2M parameters) and the client said "all worker slots are taken". Now the limit
    is a chunk + 1 MiB and w_0 comes chunked like every other tensor: ResNet20 (1.1 MB) and an 11M-parameter
    model (44 MB) start, train and are evaluated."""
    from ormo_ps.common.models import build_model as build
    from ormo_ps.worker.evaluator import run_evaluator

    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="client", batch_size=32, lr=0.01, iterations=6)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=30.0, out=str(tmp_path))
    try:
        torch.manual_seed(0)
        model = build(model_name, 10, (1, 8, 8))
        w0 = flat(model).clone()
        assert w0.numel() * 4 > live.service.chunk_bytes + (1 << 20) or model_name == "resnet20"
        with RemoteOptimizer(model, server=live.target) as opt:
            assert torch.equal(live.on_loop(lambda: live.service.core.w[:1000].clone()), w0[:1000])  # its w_0
            assert user_loop(opt, model, 1) == 6 and opt.done
        served = live.on_loop(lambda: live.service.core.w.clone())
        assert served.numel() == w0.numel() and torch.equal(flat(model), served) and not torch.equal(served, w0)
        record = run_evaluator(live.target, model=model_name, server_timeout=10)
        assert record is not None and record["iteration"] == 6 and 0.0 <= record["test_accuracy"] <= 1.0
    finally:
        stop()
