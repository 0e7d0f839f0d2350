"""A sharded server (server/front.py + server/shard.py) equals one server bit for bit, over the wire.

Real shard processes (`ps-shard`, started once for the module) and a real coordinator (ps-server's serve_run with
--shard-addresses, in a thread) are driven by a scripted client that plays K workers: each push's gradient is
cut into the shards' slices and sent on the workers' streams to the shards, in an order drawn from a seed, with
non-finite slices (refused everywhere), gradients too large to be applied (a trial on every shard, undone), worker
reconnections, Ringmaster's discards and the synchronous scheduler. The same arrivals drive one `ServerCore` in the
test; after every push the parameters each worker receives (the shards' slices put together) and the coordinator's
GetParameters equal that core's bit for bit, and each push's outcome (applied, discarded, refused with its status)
is the same.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from ormo_ps.common.codec import decode, encode
from ormo_ps.common.data import iterations_per_epoch, load_dataset
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.server.algorithms import ALGORITHMS
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import PushRejected, ServerCore
from tests.conftest import RawWorker, start_server

ROOT = Path(__file__).resolve().parents[1]
SHARD_PROCESSES = 4


@pytest.fixture(scope="module")
def shard_addresses() -> Iterator[list[str]]:
    """Four real ps-shard processes on loopback (a coordinator attaches to the first S of them, one at a time)."""
    procs = [subprocess.Popen([sys.executable, "-m", "ormo_ps.server.shard_cli", "--bind", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
             for _ in range(SHARD_PROCESSES)]
    try:
        addresses = []
        for p in procs:
            line = p.stdout.readline()
            m = re.search(r"listening on (\S+):(\d+)", line)
            assert m, f"ps-shard did not start: {line!r}"
            addresses.append(f"127.0.0.1:{m.group(2)}")
        yield addresses
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def reference(run: RunConfig) -> tuple[ServerCore, torch.Tensor]:
    dataset = load_dataset(run.dataset)
    params0 = run.initial_model(dataset).params
    return ServerCore(params0.clone(), run, iterations_per_epoch(dataset, run.batch_size)), params0


class ShardedWorker:
    """One worker of the script: its stream to the coordinator and one to each shard (sync gRPC, whole tensors)."""

    def __init__(self, coordinator: grpc.Channel) -> None:
        self.coordinator = coordinator
        self.channels: dict[str, grpc.Channel] = {}
        self.coord: RawWorker | None = None
        self.shards: list[tuple[RawWorker, int, int]] = []
        self.worker_id: int | None = None

    def join(self, worker_id: int | None = None, deadline: float = 20.0) -> pb.Welcome:
        """Register (again: the same id, once the server noticed the old stream is gone), open the shards' streams."""
        end = time.monotonic() + deadline
        while True:
            self.coord = RawWorker(pb_grpc.ParameterServerStub(self.coordinator))
            reg = pb.Register(name="script")
            if worker_id is not None:
                reg.requested_worker_id = worker_id
            self.coord.send(pb.WorkerMessage(register=reg))
            try:
                msg = self.coord.recv()
            except grpc.RpcError as e:
                self.coord.close()
                if e.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED) \
                        and time.monotonic() < end:
                    time.sleep(0.05)
                    continue
                raise
            welcome = msg.welcome
            if worker_id is None or welcome.worker_id == worker_id:
                break
            self.coord.close()  # another slot: the old stream is not gone yet
            time.sleep(0.05)
        self.worker_id = welcome.worker_id
        assert welcome.shards and welcome.session
        self.shards = []
        for ep in welcome.shards:
            ch = self.channels.get(ep.address)
            if ch is None:
                ch = self.channels[ep.address] = grpc.insecure_channel(ep.address, options=GRPC_MESSAGE_OPTIONS)
            stream = RawWorker(pb_grpc.ParameterServerStub(ch))
            stream.send(pb.WorkerMessage(register=pb.Register(requested_worker_id=welcome.worker_id,
                                                              session=welcome.session, name="script")))
            answer = stream.recv()
            assert answer.WhichOneof("payload") == "welcome", answer
            assert answer.welcome.config.num_parameters == ep.end - ep.start
            self.shards.append((stream, ep.start, ep.end))
        self.coord.ready()
        return welcome

    def parameters(self) -> tuple[torch.Tensor, int]:
        parts, indexes = [], set()
        for stream, start, end in self.shards:
            msg = stream.recv()
            assert msg.WhichOneof("payload") == "parameters", msg
            parts.append(decode(msg.parameters.tensor, expected_numel=end - start))
            indexes.add(msg.parameters.iteration_index)
        assert len(indexes) == 1, indexes
        return torch.cat(parts), indexes.pop()

    def push(self, grad: torch.Tensor, ite: int, loss: float = 1.0) -> None:
        for stream, start, end in self.shards:
            stream.send(pb.WorkerMessage(gradient=pb.Gradient(tensor=encode(grad[start:end]), iteration_index=ite,
                                                              loss=loss, sample_count=1)))

    def refused(self) -> grpc.RpcError:
        return self.coord.expect_abort()

    def leave(self) -> None:
        for stream, _, _ in self.shards:
            stream.close()
        if self.coord is not None:
            self.coord.close()

    def close(self) -> None:
        self.leave()
        for ch in self.channels.values():
            ch.close()


def wait_status(stub: pb_grpc.ParameterServerStub, done: int, deadline: float = 20.0) -> pb.Status:
    """The coordinator's status once `done` pushes were decided (applied, refused or discarded)."""
    end = time.monotonic() + deadline
    while True:
        st = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
        if st.gradients_applied + st.gradients_rejected + st.gradients_discarded >= done:
            return st
        assert time.monotonic() < end, f"{done} pushes not decided after {deadline}s: {st}"
        time.sleep(0.01)


def run_config(algo: str, workers: int) -> RunConfig:
    extra = {"ringmaster_r": 2} if algo == "ringmaster" else {}
    return RunConfig(algo=algo, workers=workers, dataset="digits", model="mlp", batch_size=64, iterations=10_000,
                     lr=0.05, seed=3, **extra)


def drive(algo: str, shards: list[str], steps: int, seed: int, tmp_path: Path) -> dict[str, int]:
    """Play `steps` pushes of K=3 workers against a sharded server and one ServerCore; compare after each."""
    K = 3
    run = run_config(algo, K)
    core, params0 = reference(run)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(shards), linger=0.0, log_every=100000,
                              sync_timeout=None)
    channel = live.channel()
    stub = pb_grpc.ParameterServerStub(channel)
    workers = [ShardedWorker(channel) for _ in range(K)]
    outcomes = {"applied": 0, "discarded": 0, "rejected": 0, "trial": 0, "rejoined": 0}
    try:
        for k, w in enumerate(workers):
            assert w.join().worker_id == k
        dispatch = core.start_with(set(range(K)))
        holding: dict[int, int] = {}
        for k, w in enumerate(workers):
            params, index = w.parameters()
            assert torch.equal(params, dispatch.params) and index == 0
            holding[k] = index
        decided = 0
        refused: set[int] = set()  # workers whose last push was refused
        sync = core.scheduler == "sync"
        for step in range(steps):
            k = rng.choice(sorted(holding))
            ite = holding.pop(k)
            grad = torch.randn(core.numel, generator=gen) * 0.1
            kind = rng.random() if not refused else 1.0  # (one refused worker at a time: the run must not diverge)
            if kind < 0.08:  # one NaN in some shard's slice: refused everywhere
                grad[rng.randrange(core.numel)] = float("nan")
            elif kind < 0.12:  # finite but too large to prove the update finite: a trial on every shard
                grad.mul_(1e38)
                outcomes["trial"] += 1
            workers[k].push(grad, ite)
            decided += 1
            try:
                expected = core.push(k, grad.clone(), ite)
            except PushRejected as e:
                err = workers[k].refused()
                assert err.code().name == e.code, (err.code(), err.details(), e)
                outcomes["rejected"] += 1
                refused.add(k)
                # the worker comes back: one server deactivates it (its stream ended), then it rejoins
                expected = core.deactivate(k)  # (a synchronous round may complete without it)
                workers[k].leave()
                wait_status(stub, decided)
                workers[k].join(k)
                d = core.rejoin(k)
                outcomes["rejoined"] += 1
                expected += [d] if d is not None else []
            else:
                refused.discard(k)
            for d in expected:
                for r in d.workers:
                    params, index = workers[r].parameters()
                    assert index == d.iteration_index, (step, r, index, d.iteration_index)
                    assert torch.equal(params, d.params), f"{algo}: step {step}, worker {r}: parameters differ"
                    holding[r] = index
            if not expected or sync:
                wait_status(stub, decided)
            if step % 5 == 0 or step == steps - 1:
                got = stub.GetParameters(pb.GetParametersRequest(), timeout=10)
                assert got.iteration_index == core.iteration
                assert torch.equal(decode(got.tensor), core.current_params()), f"{algo}: step {step}: w_t differs"
            if not holding and not sync:
                raise AssertionError("no worker holds parameters")
            if sync and not holding:
                raise AssertionError("the synchronous round did not complete")
            if rng.random() < 0.05 and len(holding) == K and not sync:  # a worker leaves and rejoins
                r = rng.choice(sorted(holding))
                workers[r].leave()
                core.deactivate(r)
                holding.pop(r)
                workers[r].join(r)
                d = core.rejoin(r)
                params, index = workers[r].parameters()
                assert torch.equal(params, d.params) and index == d.iteration_index
                holding[r] = index
                outcomes["rejoined"] += 1
        st = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert st.iteration == core.iteration
        assert st.gradients_applied == sum(rec.gradients_applied for rec in core.workers)
        outcomes["applied"] = st.gradients_applied
        outcomes["discarded"] = st.gradients_discarded
        outcomes["trials"] = live.on_loop(lambda: live.service.core.trials)
        return outcomes
    finally:
        for w in workers:
            w.close()
        stop()


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_two_shards_equal_one_server_bit_for_bit_for_every_rule(algo, shard_addresses, tmp_path):
    torch.set_num_threads(1)
    outcomes = drive(algo, shard_addresses[:2], steps=40, seed=11, tmp_path=tmp_path)
    assert outcomes["applied"] > 20, outcomes
    assert outcomes["rejected"] >= 1 and outcomes["trials"] >= 1, outcomes
    if algo == "ringmaster":
        assert outcomes["discarded"] >= 1, outcomes


@pytest.mark.parametrize("shards,algo", [(s, a) for s in (3, 4) for a in sorted(ALGORITHMS)])
def test_three_and_four_shards_equal_one_server_bit_for_bit(shards, algo, shard_addresses, tmp_path):
    torch.set_num_threads(1)
    outcomes = drive(algo, shard_addresses[:shards], steps=40, seed=5 + shards, tmp_path=tmp_path)
    assert outcomes["applied"] > 20, outcomes


def test_a_remote_optimizer_trains_on_a_sharded_server_with_no_new_argument(shard_addresses):
    """RemoteOptimizer learns the shards from the Welcome: its steps are one server's ASGD steps, and at the end
    the model holds the run's final parameters (GetParameters, put together by the coordinator)."""
    import torch.nn.functional as F

    from ormo_ps import RemoteOptimizer
    from ormo_ps.common.models import MLP

    torch.set_num_threads(1)
    run = RunConfig(algo="asgd", workers=1, dataset="digits", model="mlp", batch_size=32, lr=0.1, weight_decay=0.0,
                    iterations=20)
    core, _ = reference(run)
    core.start_with({0})
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(shard_addresses[:2]), linger=5.0,
                              chunk_mib=0.01)  # (the 20 kB slices travel in 10 KiB chunks)
    try:
        model = MLP((1, 8, 8), 10)
        data = load_dataset("digits")
        with RemoteOptimizer(model, server=live.target) as opt:
            assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), core.w)
            step = 0
            while not opt.done:
                x, y = data.normalize(data.train_x[step * 32:(step + 1) * 32]), data.train_y[step * 32:(step + 1) * 32]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                grad = torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])
                opt.step(loss=loss)
                core.push(0, grad, step)
                step += 1
                if not opt.done:
                    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), core.w)
            assert step == 20
            assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), core.w)
    finally:
        stop()


def test_shards_need_not_know_the_model(shard_addresses, monkeypatch):
    """A model only the coordinator's process knows (registered there, as a user's import path may be): the shards
    attach and apply pushes all the same (they compute nothing with the model)."""
    from torch import nn

    from ormo_ps.common import models

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5000) * 0.01)

    monkeypatch.setitem(models.MODELS, "flat-only-here", lambda num_classes, input_shape: Flat())
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="flat-only-here", iterations=100)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(shard_addresses[:2]), linger=0.0)
    channel = live.channel()
    w = ShardedWorker(channel)
    try:
        w.join()
        params, index = w.parameters()
        assert params.numel() == 5000 and index == 0
        w.push(torch.ones(5000), index)
        params2, index2 = w.parameters()
        assert index2 == 1 and torch.equal(params2, params - 0.1)  # OrMo's first step: w - eta * g
    finally:
        w.close()
        stop()
