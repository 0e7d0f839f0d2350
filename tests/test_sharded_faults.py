"""Faults of a sharded server, with real processes: a worker gone between its slices leaves no shard ahead of
another; a shard SIGKILLed stops the run without a checkpoint past the last consistent cut, and the run resumes
from that cut; the coordinator SIGKILLed (its shards stay up) is restarted from its checkpoint, and its shards
load their states of that checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from ormo_ps.common.codec import decode
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.server.checkpoint import load_checkpoint, state_digest
from ormo_ps.server.config import RunConfig
from tests.conftest import start_server
from tests.test_sharded import ShardedWorker, reference, run_config, wait_status

ROOT = Path(__file__).resolve().parents[1]


def test_a_worker_gone_between_its_slices_leaves_no_shard_ahead(tmp_path):
    """Worker 1 sends its slice to shard 0 only and goes: the push is applied nowhere (shard 0 drops the slice it
    held when the coordinator ends the session), and the others' pushes go on equal to one server's."""
    torch.set_num_threads(1)
    procs, addresses = start_shards(2)
    run = run_config("ormo", 3)
    core, _ = reference(run)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(addresses), linger=0.0,
                              log_every=100000, sync_timeout=None)
    channel = live.channel()
    stub = pb_grpc.ParameterServerStub(channel)
    workers = [ShardedWorker(channel) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    try:
        for w in workers:
            w.join()
        core.start_with({0, 1, 2})
        index = {k: w.parameters()[1] for k, w in enumerate(workers)}
        # worker 0 pushes (applied), worker 1 sends half of its gradient and vanishes
        g0 = torch.randn(core.numel, generator=gen)
        workers[0].push(g0, index[0])
        (expected,) = core.push(0, g0.clone(), index[0])
        params, index[0] = workers[0].parameters()
        assert torch.equal(params, expected.params)
        g1 = torch.randn(core.numel, generator=gen)
        stream, start, end = workers[1].shards[0]
        stream.send(pb.WorkerMessage(gradient=pb.Gradient(tensor=encode_slice(g1, start, end),
                                                          iteration_index=index[1], loss=1.0)))
        wait_verdicts(live, shard=0, worker=1)
        workers[1].leave()
        core.deactivate(1)
        wait_connected(stub, 2)
        # nothing of worker 1's push anywhere: every shard at the same iteration, the parameters one server's
        got = stub.GetParameters(pb.GetParametersRequest(), timeout=10)
        assert got.iteration_index == core.iteration == 1
        assert torch.equal(decode(got.tensor), core.current_params())
        # and the run goes on: worker 2 and worker 0 push; worker 1 comes back and pushes too
        for k in (2, 0):
            g = torch.randn(core.numel, generator=gen)
            workers[k].push(g, index[k])
            (d,) = core.push(k, g.clone(), index[k])
            params, index[k] = workers[k].parameters()
            assert torch.equal(params, d.params)
        workers[1].join(1)
        d = core.rejoin(1)
        params, index[1] = workers[1].parameters()
        assert torch.equal(params, d.params) and index[1] == d.iteration_index == 3
        g = torch.randn(core.numel, generator=gen)
        workers[1].push(g, index[1])
        (d,) = core.push(1, g.clone(), index[1])
        params, _ = workers[1].parameters()
        assert torch.equal(params, d.params)
        st = wait_status(stub, 4)
        assert (st.iteration, st.gradients_applied, st.gradients_rejected) == (4, 4, 0)
    finally:
        for w in workers:
            w.close()
        stop()
        stop_all(procs)


def encode_slice(g: torch.Tensor, start: int, end: int) -> pb.Tensor:
    from ormo_ps.common.codec import encode

    return encode(g[start:end])


def wait_verdicts(live, shard: int, worker: int, deadline: float = 10.0) -> None:
    """Until the coordinator holds the verdict of `shard` on the worker's push (the slice is held there)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        partial = live.on_loop(lambda: live.service.core.partial.get(worker))
        if partial is not None and shard in partial.verdicts:
            return
        time.sleep(0.01)
    raise AssertionError("the shard's verdict did not come")


def wait_connected(stub, count: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while stub.GetStatus(pb.GetStatusRequest(), timeout=5).workers_connected != count:
        assert time.monotonic() < end, "the worker's disconnection was not noticed"
        time.sleep(0.02)


# ----- processes ---------------------------------------------------------------------------------------------
def start_shards(count: int, ports: list[int] | None = None, *extra: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addresses = [], []
    for i in range(count):
        port = ports[i] if ports else 0
        p = subprocess.Popen([sys.executable, "-m", "ormo_ps.server.shard_cli", "--bind", f"127.0.0.1:{port}", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        procs.append(p)
        m = re.search(r"listening on \S+:(\d+)", p.stdout.readline())
        assert m, "ps-shard did not start"
        addresses.append(f"127.0.0.1:{m.group(1)}")
    return procs, addresses


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_ports(count: int) -> int:
    """A port P with P .. P+count-1 all free now (ps-server --shards puts its shards on the ports after its own)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no run of free ports")


def server_cmd(out: Path, bind: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ormo_ps.server.cli", "-k", "2", "--iterations", "1500", "--bind", bind,
            "--out", str(out), "--checkpoint-every", "0.3", "--linger", "1", "--log-every", "100", *extra]


def start_workers(address: str, count: int, logs: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "ormo_ps.worker.cli", "--server", address, "--server-timeout",
                              "120", "--slowdown", "3"], stdout=open(logs / f"worker-{k}.log", "w"),
                             stderr=subprocess.STDOUT, cwd=ROOT) for k in range(count)]


def checkpoint_iteration(out: Path) -> int:
    try:
        return load_checkpoint(out)["core"]["iteration"]
    except Exception:  # noqa: BLE001 - not there yet (or being replaced)
        return 0


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"no {what} after {timeout:.0f}s"
        time.sleep(0.1)


def check_consistent_cut(out: Path) -> int:
    """The checkpoint's manifest: every shard's file there, its digest the manifest's, at the coordinator's t."""
    state = load_checkpoint(out)
    t = state["core"]["iteration"]
    assert len(state["shards"]) >= 2
    for entry in state["shards"]:
        shard_state = load_checkpoint(out / entry["path"])
        assert state_digest(shard_state) == entry["sha256"]
        assert shard_state["core"]["iteration"] == entry["iteration"] == t
    return t


def children(pid: int, pattern: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and pattern in cmdline:
            found.append(int(d.name))
    return found


def summary(out: Path) -> dict:
    for line in reversed((out / "metrics.jsonl").read_text().splitlines()):
        record = json.loads(line)
        if record.get("event") == "summary":
            return record
    raise AssertionError("no summary record")


@pytest.mark.slow
def test_a_shard_sigkilled_stops_the_run_which_resumes_from_the_consistent_checkpoint(tmp_path):
    out = tmp_path / "run"
    port = free_ports(3)
    bind = f"127.0.0.1:{port}"
    server = subprocess.Popen(server_cmd(out, bind, "--shards", "2"), stdout=open(tmp_path / "server1.log", "w"),
                              stderr=subprocess.STDOUT, cwd=ROOT)
    workers = []
    server2 = None
    try:
        wait_for(lambda: "listening on" in (tmp_path / "server1.log").read_text(), 60, "server")
        workers = start_workers(bind, 2, tmp_path)
        wait_for(lambda: checkpoint_iteration(out) >= 100, 120, "checkpoint past iteration 100")
        shard_pids = children(server.pid, "ormo_ps.server.shard_cli")
        assert len(shard_pids) == 2, shard_pids
        os.kill(shard_pids[1], signal.SIGKILL)
        assert server.wait(30) != 0
        log = (tmp_path / "server1.log").read_text()
        assert "was lost" in log and "resume with --resume" in log, log[-2000:]
        t = check_consistent_cut(out)
        assert 0 < t < 1500
        # the run resumes from that cut, on the same address; the workers come back by themselves
        server2 = subprocess.Popen(server_cmd(out, bind, "--shards", "2", "--resume", str(out)),
                                   stdout=open(tmp_path / "server2.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        assert server2.wait(240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        log2 = (tmp_path / "server2.log").read_text()
        assert f"resuming ormo at iteration {t}" in log2
        assert summary(out)["iterations"] == 1500
        final = torch.load(out / "final.pt", weights_only=True)
        assert final["iteration"] == 1500 and torch.isfinite(final["params"]).all()
    finally:
        stop_all([server, *([server2] if server2 else []), *workers])


@pytest.mark.slow
def test_the_coordinator_sigkilled_and_restarted_resumes_with_its_shards(tmp_path):
    out = tmp_path / "run"
    shard_procs, addresses = start_shards(2)
    port = free_ports(1)
    bind = f"127.0.0.1:{port}"
    extra = ("--shard-addresses", ",".join(addresses))
    server = subprocess.Popen(server_cmd(out, bind, *extra), stdout=open(tmp_path / "server1.log", "w"),
                              stderr=subprocess.STDOUT, cwd=ROOT)
    workers, server2 = [], None
    try:
        wait_for(lambda: "listening on" in (tmp_path / "server1.log").read_text(), 60, "server")
        workers = start_workers(bind, 2, tmp_path)
        wait_for(lambda: checkpoint_iteration(out) >= 100, 120, "checkpoint past iteration 100")
        server.kill()
        server.wait(10)
        t = check_consistent_cut(out)
        assert all(p.poll() is None for p in shard_procs), "a shard went down with its coordinator"
        server2 = subprocess.Popen(server_cmd(out, bind, *extra, "--resume", str(out)),
                                   stdout=open(tmp_path / "server2.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        assert server2.wait(240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        assert f"resuming ormo at iteration {t}" in (tmp_path / "server2.log").read_text()
        assert summary(out)["iterations"] == 1500
    finally:
        stop_all([server, *([server2] if server2 else []), *workers, *shard_procs])


def test_a_second_slice_before_the_first_is_decided_is_refused_and_changes_nothing(tmp_path):
    """A client that sends shard 0 two slices in a row (its other shard none): the second is refused on its stream
    (FAILED_PRECONDITION), the first stays held, and the run's state is untouched; the others train on."""
    torch.set_num_threads(1)
    procs, addresses = start_shards(2)
    run = run_config("ormo", 2)
    core, _ = reference(run)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(addresses), linger=0.0,
                              log_every=100000, sync_timeout=None)
    channel = live.channel()
    workers = [ShardedWorker(channel) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    try:
        for w in workers:
            w.join()
        core.start_with({0, 1})
        index = {k: w.parameters()[1] for k, w in enumerate(workers)}
        stream, start, end = workers[1].shards[0]
        g = torch.randn(core.numel, generator=gen)
        for _ in range(2):
            stream.send(pb.WorkerMessage(gradient=pb.Gradient(tensor=encode_slice(g, start, end),
                                                              iteration_index=index[1], loss=1.0)))
        err = stream.expect_abort()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "one gradient at a time" in err.details()
        g0 = torch.randn(core.numel, generator=gen)
        workers[0].push(g0, index[0])
        (d,) = core.push(0, g0.clone(), index[0])
        params, _ = workers[0].parameters()
        assert torch.equal(params, d.params)
        got = pb_grpc.ParameterServerStub(channel).GetParameters(pb.GetParametersRequest(), timeout=10)
        assert got.iteration_index == 1 and torch.equal(decode(got.tensor), core.current_params())
        assert live.on_loop(lambda: live.service.core.lost) is None
    finally:
        for w in workers:
            w.close()
        stop()
        stop_all(procs)


def test_a_shard_admits_only_the_sessions_its_coordinator_announced_and_the_coordinator_takes_no_gradient(tmp_path):
    from tests.conftest import RawWorker

    procs, addresses = start_shards(2)
    run = run_config("ormo", 1)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(addresses), linger=0.0)
    channel = live.channel()
    shard_channel = grpc.insecure_channel(addresses[0], options=GRPC_MESSAGE_OPTIONS)
    try:
        for register in (pb.Register(name="stranger"), pb.Register(requested_worker_id=0, session=12345)):
            raw = RawWorker(pb_grpc.ParameterServerStub(shard_channel))
            raw.send(pb.WorkerMessage(register=register))
            assert raw.expect_abort().code() == grpc.StatusCode.PERMISSION_DENIED
            raw.close()
        w = ShardedWorker(channel)
        w.join()
        w.parameters()
        w.coord.send(pb.WorkerMessage(gradient=pb.Gradient(iteration_index=0)))
        err = w.refused()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "goes to its shards" in err.details()
        w.close()
        assert live.on_loop(lambda: live.service.core.iteration) == 0
    finally:
        shard_channel.close()
        stop()
        stop_all(procs)


def test_shards_with_exit_after_run_exit_when_their_finished_run_detaches(tmp_path):
    """`ps-shard --exit-after-run` (for `docker compose up`, which returns once every container exited): a shard
    exits 0 once the coordinator of a finished run detaches, and not when a coordinator merely goes away."""
    procs, addresses = start_shards(2, None, "--exit-after-run")
    try:
        # a coordinator that goes away mid-run: the shards stay
        live, stop = start_server(run_config("ormo", 1), bind="127.0.0.1:0", shard_addresses=tuple(addresses),
                                  linger=0.0)
        stop()
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs)
        # a run to its end: the shards exit with it
        run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", iterations=2)
        live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(addresses), linger=0.0)
        w = ShardedWorker(live.channel())
        try:
            w.join()
            for _ in range(2):
                params, index = w.parameters()
                w.push(torch.zeros_like(params), index)
            msg = w.coord.recv()
            assert msg.WhichOneof("payload") == "stop" and msg.stop.reason == pb.STOP_REASON_DONE
        finally:
            w.close()
            stop()
        assert [p.wait(20) for p in procs] == [0, 0]
    finally:
        stop_all(procs)


def test_a_silent_worker_dropped_from_a_synchronous_barrier_is_dropped_on_every_shard(tmp_path):
    """SSGD, K=2, --sync-timeout: worker 1 never pushes; the coordinator drops it from the barrier and the round
    completes on every shard with worker 0's gradient alone, as one server's does; worker 1's late push is then
    refused (it is no longer active) and it rejoins."""
    torch.set_num_threads(1)
    procs, addresses = start_shards(2)
    run = run_config("ssgd", 2)
    core, _ = reference(run)
    live, stop = start_server(run, bind="127.0.0.1:0", shard_addresses=tuple(addresses), linger=0.0,
                              log_every=100000, sync_timeout=1.0)
    channel = live.channel()
    stub = pb_grpc.ParameterServerStub(channel)
    workers = [ShardedWorker(channel) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    try:
        for w in workers:
            w.join()
        core.start_with({0, 1})
        index = {k: w.parameters()[1] for k, w in enumerate(workers)}
        g0 = torch.randn(core.numel, generator=gen)
        workers[0].push(g0, index[0])
        assert core.push(0, g0.clone(), index[0]) == []  # one server waits for worker 1
        (d,) = core.deactivate(1)  # until the barrier drops it
        params, index[0] = workers[0].parameters()  # (after ~1 s)
        assert torch.equal(params, d.params) and index[0] == 1
        g1 = torch.randn(core.numel, generator=gen)
        workers[1].push(g1, index[1])
        err = workers[1].refused()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not active" in err.details()
        workers[1].leave()
        wait_connected(stub, 1)
        workers[1].join(1)
        rejoined = core.rejoin(1)
        params, index[1] = workers[1].parameters()
        assert torch.equal(params, rejoined.params) and index[1] == 1
        got = stub.GetParameters(pb.GetParametersRequest(), timeout=10)
        assert torch.equal(decode(got.tensor), core.current_params()) and got.iteration_index == 1
    finally:
        for w in workers:
            w.close()
        stop()
        stop_all(procs)
