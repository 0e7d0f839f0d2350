"""The gRPC service against real clients: the handshake, the unary calls, health, and every bad input.

Each bad input ends its stream with its gRPC status and a message naming the problem, leaves the
server's state (w, the iteration, the rule's state) exactly as it was, and the run goes on: the other
worker's next gradient is applied and the refused worker may come back with its requested id.
"""

from __future__ import annotations

import asyncio

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ormo_ps.common.codec import decode, encode
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.server.serving import listening_port
from ormo_ps.server.config import RunConfig
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.server.core import ServerCore

if TYPE_CHECKING:
    from conftest import LiveServer, RawWorker

# digits (8x8 images, 10 classes) through the MLP: 64*128 + 128 + 128*10 + 10 parameters.
NUM_PARAMETERS = 9610
RPC_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent

MakeWorker = Callable[[], "RawWorker"]


# ----- helpers ------------------------------------------------------------------------------
def gradient_message(iteration_index: int, tensor: pb.Tensor | torch.Tensor | None = None) -> pb.WorkerMessage:
    if tensor is None:
        tensor = torch.full((NUM_PARAMETERS,), 0.01)
    if isinstance(tensor, torch.Tensor):
        tensor = encode(tensor)
    return pb.WorkerMessage(gradient=pb.Gradient(tensor=tensor, iteration_index=iteration_index, loss=2.3,
                                                 sample_count=32))


def good_gradient(seed: int) -> torch.Tensor:
    return torch.randn(NUM_PARAMETERS, generator=torch.Generator().manual_seed(seed)) * 0.01


def snapshot(server: LiveServer) -> dict[str, Any]:
    """w, the iteration and the rule's state, copied on the server's loop (consistent, race-free)."""

    def take() -> dict[str, Any]:
        core = server.service.core
        rule = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in core.rule.state_dict().items()}
        return {"w": core.w.clone(), "iteration": core.iteration, "rule": rule}

    return server.on_loop(take)


def counters(server: LiveServer) -> tuple[int, int, dict[str, int]]:
    def take():
        c = server.service.counters
        return c.gradients_applied, c.gradients_rejected, dict(c.rejected_by_reason)

    return server.on_loop(take)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["iteration"] == b["iteration"]
    assert torch.equal(a["w"], b["w"])
    assert a["rule"].keys() == b["rule"].keys()
    for key, va in a["rule"].items():
        vb = b["rule"][key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key


def start_run(make: MakeWorker) -> tuple[RawWorker, RawWorker]:
    """Two raw workers register and get ready; both receive (w_0, 0). Returns them as (worker 0, worker 1)."""
    a, b = make(), make()
    assert a.register(name="a").worker_id == 0
    assert b.register(name="b").worker_id == 1
    a.ready()
    b.ready()
    assert a.parameters().iteration_index == 0
    assert b.parameters().iteration_index == 0
    return a, b


def reference_core(server: LiveServer, w0: torch.Tensor) -> ServerCore:
    """A fresh core with the server's config and w_0: what the server must match after the good pushes."""
    core = server.service.core
    ref = ServerCore(w0.clone(), core.run, core.lr_schedule.iterations_per_epoch)
    ref.start()
    return ref


def status(server: LiveServer) -> pb.Status:
    return server.stub().GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT)


def assert_aborted(worker: RawWorker, code: grpc.StatusCode, message: str) -> None:
    error = worker.expect_abort()
    assert error.code() == code, (error.code(), error.details())
    assert message in error.details(), error.details()


# ----- unary calls and health ------------------------------------------------------------------
def test_get_status_and_get_parameters(server: LiveServer):
    st = status(server)
    assert (st.iteration, st.workers_connected, st.gradients_applied, st.gradients_rejected, st.done) == (0, 0, 0, 0,
                                                                                                       False)
    assert (st.config.algorithm, st.config.model, st.config.dataset, st.config.num_workers) == ("ormo", "mlp",
                                                                                                 "digits", 2)
    assert (st.config.num_classes, st.config.batch_size, st.config.total_iterations) == (10, 32, 1_000_000)
    assert st.config.num_parameters == NUM_PARAMETERS

    params = server.stub().GetParameters(pb.GetParametersRequest(), timeout=RPC_TIMEOUT)
    assert params.iteration_index == 0
    assert params.tensor.dtype == pb.DTYPE_FLOAT32
    assert params.tensor.numel == NUM_PARAMETERS
    w = decode(params.tensor, expected_numel=NUM_PARAMETERS, expected_dtype=torch.float32)
    assert torch.equal(w, snapshot(server)["w"])


@pytest.mark.parametrize("service_name", ["", "ps.v1.ParameterServer"])
def test_health_service_answers_serving(server: LiveServer, service_name: str):
    health = health_pb2_grpc.HealthStub(server.channel())
    reply = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=RPC_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ----- the handshake and the first gradients ---------------------------------------------------
def test_handshake_then_a_gradient_is_applied_and_answered_at_once(server: LiveServer, raw_workers: MakeWorker):
    w0 = snapshot(server)["w"]
    a = raw_workers()
    welcome = a.register(name="a")
    assert welcome.worker_id == 0
    assert welcome.config.num_parameters == NUM_PARAMETERS
    assert welcome.config.num_workers == 2
    a.ready()
    assert status(server).workers_connected == 1  # still waiting for the second worker: nothing sent yet
    b = raw_workers()
    assert b.register(name="b").worker_id == 1
    b.ready()
    pa, pb_ = a.parameters(), b.parameters()
    assert (pa.iteration_index, pb_.iteration_index) == (0, 0)
    assert torch.equal(decode(pa.tensor, expected_numel=NUM_PARAMETERS), w0)

    g = good_gradient(1)
    a.send(gradient_message(0, g))
    answer = a.parameters()  # async: the pusher is answered at once, with the new index
    assert answer.iteration_index == 1
    st = status(server)
    assert (st.iteration, st.gradients_applied, st.workers_connected) == (1, 1, 2)

    ref = reference_core(server, w0)
    ref.push(0, g, 0)
    assert torch.equal(decode(answer.tensor), ref.rule.params_to_send(ref.lr()))
    assert torch.equal(snapshot(server)["w"], ref.w)


# ----- bad gradients on a running stream -------------------------------------------------------
def _tensor(dtype: int, numel: int, nbytes: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, numel=numel, data=b"\0" * nbytes)


def _with(value: float) -> torch.Tensor:
    g = torch.full((NUM_PARAMETERS,), 0.01)
    g[123] = value
    return g


N = NUM_PARAMETERS
# (id, the message worker 0 sends while it holds index 0 and the server is at iteration 1, message, reason)
BAD_GRADIENTS = [
    ("wrong numel", gradient_message(0, torch.full((N + 1,), 0.01)),
     f"tensor numel is {N + 1}, expected {N}", "tensor"),
    ("float64", gradient_message(0, torch.full((N,), 0.01, dtype=torch.float64)),
     "tensor dtype is DTYPE_FLOAT64, expected DTYPE_FLOAT32", "tensor"),
    ("data length != numel", gradient_message(0, _tensor(pb.DTYPE_FLOAT32, N, 4 * N - 3)),
     f"tensor data is {4 * N - 3} bytes, expected numel {N}", "tensor"),
    ("dtype unspecified", gradient_message(0, _tensor(pb.DTYPE_UNSPECIFIED, N, 4 * N)),
     "DTYPE_UNSPECIFIED", "tensor"),
    ("NaN", gradient_message(0, _with(float("nan"))), "is not finite", "nonfinite"),
    ("Inf", gradient_message(0, _with(float("inf"))), "is not finite", "nonfinite"),
    ("-Inf", gradient_message(0, _with(float("-inf"))), "is not finite", "nonfinite"),
    ("index from the future", gradient_message(5), "iteration index 5 is from the future", "invalid_argument"),
    ("index not the one sent", gradient_message(1),
     "worker 0 was sent parameters with index 0, but its gradient claims index 1", "invalid_argument"),
]


@pytest.mark.parametrize("bad,message,reason", [b[1:] for b in BAD_GRADIENTS], ids=[b[0] for b in BAD_GRADIENTS])
def test_bad_gradient_is_refused_and_changes_nothing(server: LiveServer, raw_workers: MakeWorker,
                                                     bad: pb.WorkerMessage, message: str, reason: str):
    w0 = snapshot(server)["w"]
    a, b = start_run(raw_workers)
    g1 = good_gradient(1)
    b.send(gradient_message(0, g1))
    assert b.parameters().iteration_index == 1  # worker 1 now holds index 1, worker 0 still index 0
    before, (applied0, rejected0, reasons0) = snapshot(server), counters(server)

    a.send(bad)
    assert_aborted(a, grpc.StatusCode.INVALID_ARGUMENT, message)

    assert_same_state(before, snapshot(server))
    applied, rejected, reasons = counters(server)
    assert (applied, rejected) == (applied0, rejected0 + 1)
    assert reasons.get(reason, 0) == reasons0.get(reason, 0) + 1

    # The run goes on: worker 1's next gradient is applied as if the bad one had never come ...
    g2 = good_gradient(2)
    b.send(gradient_message(1, g2))
    assert b.parameters().iteration_index == 2
    ref = reference_core(server, w0)
    ref.push(1, g1, 0)
    ref.push(1, g2, 1)
    assert_same_state(snapshot(server), {"w": ref.w, "iteration": 2, "rule": ref.rule.state_dict()})
    # ... and worker 0 comes back with its id and gets the current parameters and index.
    again = raw_workers()
    assert again.register(worker_id=0).worker_id == 0
    again.ready()
    p = again.parameters()
    assert p.iteration_index == 2
    assert torch.equal(decode(p.tensor, expected_numel=N), ref.rule.params_to_send(ref.lr()))
    again.send(gradient_message(2, good_gradient(3)))
    assert again.parameters().iteration_index == 3
    assert status(server).iteration == 3


# ----- bad stream openings and protocol order ---------------------------------------------------
FIRST_MESSAGES = [
    ("gradient", gradient_message(0)),
    ("ready", pb.WorkerMessage(ready=pb.Ready())),
    ("empty", pb.WorkerMessage()),
]


@pytest.mark.parametrize("first", [m for _, m in FIRST_MESSAGES], ids=[n for n, _ in FIRST_MESSAGES])
def test_first_message_must_be_register(server: LiveServer, raw_workers: MakeWorker, first: pb.WorkerMessage):
    before = snapshot(server)
    w = raw_workers()
    w.send(first)
    assert_aborted(w, grpc.StatusCode.INVALID_ARGUMENT, "the first message on a Train stream must be Register")
    assert_same_state(before, snapshot(server))
    assert status(server).workers_connected == 0
    a, _ = start_run(raw_workers)  # the run goes on
    a.send(gradient_message(0))
    assert a.parameters().iteration_index == 1


ORDER_ERRORS = [
    # (id, whether the run has started (both workers Ready), what worker 0 sends, the refusal's message)
    ("gradient before Ready", False, gradient_message(0), "expected Ready on the Train stream, got gradient"),
    ("empty before Ready", False, pb.WorkerMessage(),
     "expected Ready on the Train stream, got an empty message"),
    ("empty after Ready", True, pb.WorkerMessage(),
     "expected a Gradient on the Train stream, got an empty message"),
    ("Register again", True, pb.WorkerMessage(register=pb.Register()),
     "expected a Gradient on the Train stream, got register"),
    ("Ready again", True, pb.WorkerMessage(ready=pb.Ready()), "expected a Gradient on the Train stream, got ready"),
]


@pytest.mark.parametrize("started,bad,message", [o[1:] for o in ORDER_ERRORS], ids=[o[0] for o in ORDER_ERRORS])
def test_message_out_of_order_is_refused(server: LiveServer, raw_workers: MakeWorker, started: bool,
                                         bad: pb.WorkerMessage, message: str):
    if started:
        w, other = start_run(raw_workers)
    else:
        w, other = raw_workers(), None
        assert w.register().worker_id == 0
    before = snapshot(server)
    w.send(bad)
    assert_aborted(w, grpc.StatusCode.INVALID_ARGUMENT, message)
    assert_same_state(before, snapshot(server))
    if other is None:  # refused before the run started: two workers start it
        a, b = raw_workers(), raw_workers()
        assert {a.register().worker_id, b.register().worker_id} == {0, 1}
        a.ready()
        b.ready()
        assert a.parameters().iteration_index == 0 == b.parameters().iteration_index
        other = a
    other.send(gradient_message(0))  # the run goes on
    assert other.parameters().iteration_index == 1
    assert status(server).iteration == 1


# ----- admission: ids and slots -----------------------------------------------------------------
@pytest.mark.parametrize("requested", [99, 2, -1])
def test_requested_worker_id_out_of_range_is_refused(server: LiveServer, raw_workers: MakeWorker, requested: int):
    a, _ = start_run(raw_workers)
    before = snapshot(server)
    w = raw_workers()
    w.send(pb.WorkerMessage(register=pb.Register(requested_worker_id=requested)))
    assert_aborted(w, grpc.StatusCode.INVALID_ARGUMENT, f"requested worker id {requested} is out of range 0..1")
    assert_same_state(before, snapshot(server))
    a.send(gradient_message(0))
    assert a.parameters().iteration_index == 1
    assert status(server).workers_connected == 2


def test_second_stream_for_an_open_worker_id_is_refused(server: LiveServer, raw_workers: MakeWorker):
    a, _ = start_run(raw_workers)
    before = snapshot(server)
    dup = raw_workers()
    dup.send(pb.WorkerMessage(register=pb.Register(requested_worker_id=0)))
    assert_aborted(dup, grpc.StatusCode.ALREADY_EXISTS, "worker 0 already has an open Train stream")
    assert_same_state(before, snapshot(server))
    # The first stream of worker 0 is untouched.
    a.send(gradient_message(0))
    assert a.parameters().iteration_index == 1
    assert status(server).workers_connected == 2


def test_worker_beyond_k_is_refused(server: LiveServer, raw_workers: MakeWorker):
    _, b = start_run(raw_workers)
    before = snapshot(server)
    extra = raw_workers()
    extra.send(pb.WorkerMessage(register=pb.Register(name="third")))
    assert_aborted(extra, grpc.StatusCode.RESOURCE_EXHAUSTED, "all 2 worker slots are taken")
    assert_same_state(before, snapshot(server))
    b.send(gradient_message(0))
    assert b.parameters().iteration_index == 1
    assert status(server).workers_connected == 2


def test_worker_reconnects_after_its_stream_was_aborted(server: LiveServer, raw_workers: MakeWorker):
    a, b = start_run(raw_workers)
    for ite in range(3):  # worker 1 moves the run to iteration 3
        b.send(gradient_message(ite, good_gradient(ite)))
        assert b.parameters().iteration_index == ite + 1
    a.send(gradient_message(0, _with(float("nan"))))
    assert_aborted(a, grpc.StatusCode.INVALID_ARGUMENT, "NaN")
    # At once, on the status: the server frees the slot before it sends the status.
    again = raw_workers()
    assert again.register(worker_id=0).worker_id == 0
    again.ready()
    p = again.parameters()
    assert p.iteration_index == 3
    assert torch.equal(decode(p.tensor, expected_numel=N), snapshot(server)["w"])
    again.send(gradient_message(3))
    assert again.parameters().iteration_index == 4
    st = status(server)
    assert (st.iteration, st.gradients_applied, st.gradients_rejected, st.workers_connected) == (4, 4, 1, 2)


def test_fixture_server_stops_cleanly(start_live_server):
    """Teardown leaves no server thread and no listening port behind."""
    run = RunConfig(algo="ormo", workers=2, dataset="digits", model="mlp", batch_size=32, iterations=1_000_000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0)
    health = health_pb2_grpc.HealthStub(live.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == \
        health_pb2.HealthCheckResponse.SERVING
    stop()
    assert not any(t.name == "ps-server-under-test" for t in threading.enumerate())
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5.0)
        s.connect(("127.0.0.1", live.port))


# ----- real processes ---------------------------------------------------------------------------
def _pump(stream, lines: list[str], seen: threading.Event | None = None, prefix: str | None = None) -> None:
    for line in stream:
        lines.append(line)
        if seen is not None and prefix is not None and line.startswith(prefix):
            seen.set()


@pytest.mark.slow
def test_real_processes_survive_a_killed_worker(tmp_path: Path):
    deadline = time.monotonic() + 120.0
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith("PS_")]:
        del env[key]  # the CLIs read PS_* variables: keep the test's flags the only configuration
    out = tmp_path / "run"
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []

    def spawn(*args: str) -> tuple[subprocess.Popen, list[str]]:
        p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p, []

    try:
        server, server_lines = spawn("ormo_ps.server.cli", "--bind", "127.0.0.1:0", "--workers", "2", "--iterations", "300",
                                     "--dataset", "digits", "--model", "mlp", "--batch-size", "32", "--out", str(out),
                                     "--linger", "0")
        bound = threading.Event()
        t = threading.Thread(target=_pump, args=(server.stdout, server_lines, bound, "ps-server listening on "),
                             daemon=True)
        t.start()
        threads.append(t)
        while not bound.wait(0.1):  # ends early if the server dies before it binds
            assert server.poll() is None and time.monotonic() < deadline, "".join(server_lines)
        line = next(x for x in server_lines if x.startswith("ps-server listening on "))
        port = listening_port(line)
        address = line.split()[-1]
        assert address == f"127.0.0.1:{port}" and port > 0

        workers = []
        for _ in range(2):
            p, lines = spawn("ormo_ps.worker.cli", "--server", address, "--threads", "1")
            t = threading.Thread(target=_pump, args=(p.stdout, lines), daemon=True)
            t.start()
            threads.append(t)
            workers.append((p, lines))

        with grpc.insecure_channel(address, options=GRPC_MESSAGE_OPTIONS) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            iteration = 0
            while time.monotonic() < deadline:
                iteration = stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT).iteration
                if iteration > 50:
                    break
                time.sleep(0.01)
            assert 50 < iteration < 300, f"iteration {iteration} when the worker should be killed"
        victim, survivor = workers
        victim[0].send_signal(signal.SIGKILL)
        victim[0].wait(timeout=10)

        assert server.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, "".join(server_lines)
        assert survivor[0].wait(timeout=max(1.0, deadline - time.monotonic())) == 0, "".join(survivor[1])
        for t in threads:
            t.join(timeout=5)
        results = [json.loads(x) for x in survivor[1] if x.startswith("{")]
        assert len(results) == 1, "".join(survivor[1])
        assert results[0]["stop_reason"] == "STOP_REASON_DONE"
        assert results[0]["gradients_sent"] > 0

        assert (out / "final.pt").is_file()
        assert (out / "checkpoint.pt").is_file()
        final = torch.load(out / "final.pt", weights_only=False)
        assert final["iteration"] == 300
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        summary = records[-1]
        assert summary["event"] == "summary", summary
        assert summary["iterations"] == 300
        assert sum(summary["gradients_per_worker"]) == 300
        assert min(summary["gradients_per_worker"]) > 0  # the killed worker had taken part before it died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()


def test_a_worker_whose_id_was_taken_gets_a_free_slot(server: LiveServer, raw_workers: MakeWorker):
    """After a resume, a restarted worker (no id) may take the slot of one still on its way back: the
    returning worker must get in (another free slot), not be refused forever."""
    newcomer = raw_workers()
    assert newcomer.register().worker_id == 0
    returning = raw_workers()
    assert returning.register(worker_id=0).worker_id == 1
    newcomer.ready()
    returning.ready()
    assert newcomer.parameters().iteration_index == 0 and returning.parameters().iteration_index == 0
    assert status(server).workers_connected == 2


def test_checkpoints_asked_for_at_once_are_written_one_after_the_other(tmp_path):
    """The final checkpoint can be asked for while a periodic one is being written: both write the same
    temporary file, so they must not overlap (they did: the run then never finished)."""
    from ormo_ps.server.cli import ServeOptions, build_service

    service = build_service(RunConfig(workers=1, dataset="digits", model="mlp", batch_size=32, iterations=10),
                            ServeOptions(out=str(tmp_path)))

    async def many() -> list:
        return await asyncio.gather(*(service.checkpoint() for _ in range(8)))

    assert asyncio.run(many()) == [tmp_path / "checkpoint.pt"] * 8
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_server_keeps_what_each_worker_says_of_its_speed(server: LiveServer, raw_workers: MakeWorker):
    fast, slow = raw_workers(), raw_workers()
    fast.send(pb.WorkerMessage(register=pb.Register(name="fast")))
    slow.send(pb.WorkerMessage(register=pb.Register(name="slow", slowdown=4.0)))
    ids = {fast.recv().welcome.worker_id: 1.0, slow.recv().welcome.worker_id: 4.0}
    assert server.on_loop(lambda: dict(server.service.worker_slowdowns)) == ids
