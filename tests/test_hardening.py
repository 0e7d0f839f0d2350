"""What a hostile or careless client (or a full disk) could do to ps-server, each with a real server process
on loopback (issue #11; bench/results/hostile.md re-runs the probes with their numbers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.hostile import big_request
from ormo_ps.server.serving import listening_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONUNBUFFERED": "1"}
RUN = ["--workers", "2", "--dataset", "digits", "--model", "mlp", "--batch-size", "32"]


def start(*argv: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=ENV, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def port_of(proc: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            port = listening_port(line)
            if port is not None:
                return port
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no listening line: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one `Error: ...` line and no traceback; returns that line."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def ps_server(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ormo_ps.server.cli", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ----- 2: a port in use --------------------------------------------------------------------------------
def test_a_second_server_on_a_port_in_use_is_a_one_line_error(tmp_path):
    first_log = tmp_path / "a.log"
    first = start("ormo_ps.server.cli", *RUN, "--iterations", "1000", "--bind", "127.0.0.1:0", "--out", str(tmp_path / "a"),
                  log=first_log)
    try:
        port = port_of(first, first_log)
        second = ps_server(*RUN, "--bind", f"127.0.0.1:{port}", "--out", str(tmp_path / "b"))
        assert f"port {port} on 127.0.0.1 is in use" in one_line_error(second)
        assert first.poll() is None  # the first one serves on, alone
    finally:
        stop(first)
    with socket.socket() as other:  # any other socket holding the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        held = other.getsockname()[1]
        assert f"port {held} on 127.0.0.1 is in use" in one_line_error(
            ps_server(*RUN, "--bind", f"127.0.0.1:{held}", "--out", str(tmp_path / "c")))


# ----- 7: an empty token -------------------------------------------------------------------------------
def test_an_empty_token_is_refused_like_an_empty_token_file(tmp_path):
    (tmp_path / "empty").write_text("\n")
    assert "token file" in one_line_error(ps_server("--token-file", str(tmp_path / "empty")))
    assert "the token is empty" in one_line_error(ps_server("--token", ""))
    assert "the token is empty" in one_line_error(ps_server("--token", "  "))
    worker = subprocess.run([sys.executable, "-m", "ormo_ps.worker.cli", "--token", "", "--server", "127.0.0.1:1"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert "the token is empty" in one_line_error(worker)


# ----- 8: mistakes that printed tracebacks -------------------------------------------------------------
def test_an_output_directory_that_cannot_be_written_is_a_one_line_error(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.access(readonly, os.W_OK):  # root writes anywhere: a file where a directory must be serves instead
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "out"
    else:
        target = readonly / "out"
    assert "cannot write to --out" in one_line_error(ps_server("--out", str(target)))


# ----- 1: memory before authentication -----------------------------------------------------------------
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def call_with(port: int, payload: bytes, token: str | None):
    """The status code of a raw GetParameters call carrying `payload`."""
    import grpc

    from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS) as channel:
        call = channel.unary_unary("/ps.v1.ParameterServer/GetParameters", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            call(payload, timeout=60, metadata=(("authorization", f"Bearer {token}"),) if token else None)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_huge_requests_are_refused_before_they_are_read(tmp_path):
    """200 MB requests, unauthenticated and authenticated, four at once: the server's memory stays put."""
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    log = tmp_path / "server.log"
    server = start("ormo_ps.server.cli", *RUN, "--iterations", "1000", "--bind", "127.0.0.1:0", "--out", str(tmp_path),
                   "--token", "s3cret", log=log)
    try:
        port = port_of(server, log)
        assert call_with(port, b"", "s3cret") == grpc.StatusCode.OK  # warm: the first answer allocates
        before = rss_mib(server.pid)
        payload = big_request(200)
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda token: call_with(port, payload, token), [None, None, None, "s3cret"]))
        grown = rss_mib(server.pid) - before
    finally:
        stop(server)
    assert codes[:3] == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert codes[3] == grpc.StatusCode.RESOURCE_EXHAUSTED  # larger than any message this model needs
    assert grown < 50, f"the server grew by {grown:.0f} MiB"


# ----- 3: slots held by streams that never say Ready ------------------------------------------------------
def test_a_slot_never_made_ready_is_given_back_and_refused_workers_wait_for_one(start_live_server, tmp_path):
    import grpc

    from ormo_ps.common.pb import parameter_server_pb2 as pb
    from ormo_ps.server.config import RunConfig
    from tests.conftest import RawWorker

    run = RunConfig(workers=2, dataset="digits", model="mlp", batch_size=32, iterations=60)
    live, stop_server = start_live_server(run, bind="127.0.0.1:0", linger=30.0, ready_timeout=8.0)
    squatters, workers = [], []
    try:
        for _ in range(2):  # register, then never say Ready: both slots are held
            squatter = RawWorker(live.stub())
            squatter.register()
            squatters.append(squatter)
        logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        workers = [start("ormo_ps.worker.cli", "--server", live.target, "--threads", "1", "--server-timeout", "60", log=log)
                   for log in logs]
        for squatter in squatters:
            error = squatter.expect_abort()
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no Ready within 8s" in error.details()
        for w, log in zip(workers, logs):
            assert w.wait(120) == 0, log.read_text()[-2000:]
            assert '"stop_reason": "STOP_REASON_DONE"' in log.read_text()
        assert any("all worker slots are taken" in log.read_text() for log in logs)  # they waited, not quit
        assert live.on_loop(lambda: live.service.core.iteration) == 60
    finally:
        for squatter in squatters:
            squatter.close()
        for w in workers:
            stop(w)
        stop_server()
    del pb


# ----- 4: finite but huge gradients, and a diverging run ---------------------------------------------------
def test_huge_finite_gradients_never_reach_the_parameters_and_the_run_ends_as_diverged(start_live_server):
    import grpc
    import torch

    from ormo_ps.common.codec import decode, encode
    from ormo_ps.common.pb import parameter_server_pb2 as pb
    from ormo_ps.server.config import RunConfig
    from tests.conftest import RawWorker

    run = RunConfig(workers=1, dataset="digits", model="mlp", batch_size=32, iterations=1000)
    live, stop_server = start_live_server(run, bind="127.0.0.1:0", linger=30.0)
    worker = None
    try:
        codes = []
        for _ in range(12):
            worker = RawWorker(live.stub())
            worker.send(pb.WorkerMessage(register=pb.Register(name="raw")))
            first = worker.recv()
            if first.WhichOneof("payload") == "stop":  # the run is over: a newcomer is told why
                assert first.stop.reason == pb.STOP_REASON_DIVERGED and "diverged" in first.stop.detail
                break
            numel = first.welcome.config.num_parameters
            worker.ready()
            msg = worker.recv()
            params = decode(msg.parameters.tensor)
            assert torch.isfinite(params).all()  # no parameter ever sent is infinite
            gradient = pb.WorkerMessage(gradient=pb.Gradient(iteration_index=msg.parameters.iteration_index, loss=1.0))
            encode(torch.full((numel,), 3.4e38), out=gradient.gradient.tensor)
            worker.send(gradient)
            try:
                reply = worker.recv()
                if reply.WhichOneof("payload") == "stop":  # the refusal that ended the run says so
                    assert reply.stop.reason == pb.STOP_REASON_DIVERGED
                    codes.append("DIVERGED")
                else:
                    codes.append("applied")
            except grpc.RpcError as e:
                codes.append(e.code().name)
                assert "non-finite" in e.details()
            worker.close()
        # Applied while the result was finite; then refused until three in a row ended the run.
        assert codes[0] == "applied" and codes[-3:] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "DIVERGED"]
        status = live.stub().GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.done and status.diverged
        assert torch.isfinite(live.on_loop(lambda: live.service.core.w.clone())).all()
    finally:
        if worker is not None:
            worker.close()
        stop_server()


def test_a_run_with_a_huge_learning_rate_ends_as_diverged_and_every_process_says_so(tmp_path):
    log = tmp_path / "server.log"
    # --linger: the server stays a few seconds after the end, so workers that were reconnecting learn of it.
    server = start("ormo_ps.server.cli", *RUN, "--lr", "1e30", "--iterations", "2000", "--bind", "127.0.0.1:0",
                   "--out", str(tmp_path / "out"), "--linger", "15", log=log)
    workers = []
    try:
        port = port_of(server, log)
        logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        workers = [start("ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1", log=wl) for wl in logs]
        assert server.wait(120) == 3, log.read_text()[-3000:]
        assert "Error: the run diverged at iteration" in log.read_text()
        for w, wl in zip(workers, logs):
            assert w.wait(60) == 3, wl.read_text()[-2000:]
            assert "Error: the server ended the run: the run diverged" in wl.read_text()
            assert "Traceback" not in wl.read_text()
    finally:
        stop(server)
        for w in workers:
            stop(w)
    import json

    import torch

    summary = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
               if '"summary"' in line][-1]
    assert summary["diverged"] and summary["diverged_at_iteration"] is not None
    assert torch.isfinite(torch.load(tmp_path / "out" / "final.pt", weights_only=True)["params"]).all()


# ----- 6: a full disk ---------------------------------------------------------------------------------------
def test_a_full_disk_ends_no_stream_keeps_the_last_good_checkpoint_and_is_reported_once(tmp_path):
    """The server writes into a 4 MiB tmpfs of its own mount namespace; the test fills it mid-run (through
    /proc/PID/root). Training goes on, each kind of failure is logged once, SIGTERM exits with one error line
    and the last good checkpoint is intact."""
    from ormo_ps.server.checkpoint import load_checkpoint
    from tests import small_disk

    if (why := small_disk.unavailable()) is not None:
        pytest.skip(why)
    (tmp_path / "disk").mkdir()
    server = small_disk.ServerOnSmallDisk(tmp_path / "disk", tmp_path / "server.log",
                                          [*RUN, "--iterations", "1000000", "--bind", "127.0.0.1:0",
                                           "--checkpoint-every", "0.3", "--log-every", "20"], cwd=ROOT, env=ENV)
    workers = []
    try:
        port = server.port()
        workers = [start("ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1", "--server-timeout", "3",
                         log=tmp_path / f"w{i}.log") for i in range(2)]
        server.wait_for("checkpoint at iteration")
        server.fill()
        full_at = server.log.read_text().count("\n")
        time.sleep(3.0)  # several periodic checkpoints and progress records fail meanwhile
        after = server.log.read_text().splitlines()[full_at:]
        iterations = [int(line.split("iter ")[1].split("/")[0]) for line in after if "ormo_ps.server.service: iter " in line]
        assert len(iterations) > 5 and iterations[-1] > iterations[0], "training must go on"  # streams live on
        assert sum("cannot write the checkpoint" in line for line in after) == 1, "\n".join(after[-30:])
        assert sum("cannot write metrics" in line for line in after) == 1
        assert server.sigterm() == 1
        text = server.log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "could not write the checkpoint on shutdown" in errors[0], text[-2000:]
        assert "Traceback" not in text and "Task exception was never retrieved" not in text
        good = int(errors[0].split("the last good checkpoint (iteration ")[1].split(")")[0])
        assert load_checkpoint(server.disk)["core"]["iteration"] == good  # intact, and the one named
        assert not list(server.disk.glob(".*.tmp"))
    finally:
        server.close()
        for w in workers:
            stop(w)


# ----- 9: log flooding, and ambiguous credentials -----------------------------------------------------------
def test_refused_calls_cannot_flood_the_log_and_two_tokens_are_refused(tmp_path):
    import grpc

    log = tmp_path / "server.log"
    server = start("ormo_ps.server.cli", *RUN, "--iterations", "1000", "--bind", "127.0.0.1:0", "--out", str(tmp_path),
                   "--token", "s3cret", log=log)
    try:
        port = port_of(server, log)
        size_before = log.stat().st_size
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/" + "x" * 8000, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            for _ in range(300):
                with pytest.raises(grpc.RpcError):
                    call(b"", timeout=10)
            status = channel.unary_unary("/ps.v1.ParameterServer/GetStatus", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as twice:  # a right token and a wrong one: which one counts?
                status(b"", timeout=10, metadata=(("authorization", "Bearer s3cret"), ("authorization", "Bearer x")))
            assert twice.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert status(b"", timeout=10, metadata=(("authorization", "Bearer s3cret"),)) is not None
        grown = log.stat().st_size - size_before
    finally:
        stop(server)
    assert grown < 5000, f"300 refused calls added {grown} bytes to the log"
    assert max(len(line) for line in log.read_text().splitlines()) < 300


# ----- 5: a silent half-open link -------------------------------------------------------------------------
def test_a_silent_half_open_link_stalls_a_synchronous_run_no_longer_than_keepalive(tmp_path):
    """One worker of a synchronous K=2 run talks through a proxy that goes silent (TCP stays open, nothing
    passes): the round waits until the server's keepalive declares that stream dead, then goes on with
    the other worker. The README promises about 20 s (keepalive time + timeout); bench/results/hostile.md
    has the measured stall."""
    from ormo_ps.common.grpc_options import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
    from tests.freezable_proxy import FreezableProxy

    log = tmp_path / "server.log"
    server = start("ormo_ps.server.cli", *RUN, "--algo", "ssgd", "--iterations", "1000000", "--bind", "127.0.0.1:0",
                   "--out", str(tmp_path), "--log-every", "10", "--sync-timeout", "600", log=log)
    workers, proxy = [], None
    try:
        port = port_of(server, log)
        proxy = FreezableProxy(("127.0.0.1", port))
        workers = [start("ormo_ps.worker.cli", "--server", f"127.0.0.1:{p}", "--threads", "1", "--name", name,
                         "--server-timeout", "120", log=tmp_path / f"{name}.log")
                   for p, name in ((proxy.port, "behind-proxy"), (port, "direct"))]
        deadline = time.monotonic() + 60
        while "iter 100/" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        proxy.freeze()
        frozen_at = time.monotonic()
        while "disconnected" not in log.read_text():
            assert time.monotonic() - frozen_at < 120, log.read_text()[-2000:]
            time.sleep(0.2)
        stall = time.monotonic() - frozen_at
    finally:
        if proxy is not None:
            proxy.close()
        stop(server)
        for w in workers:
            stop(w)
    bound = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
    (tmp_path / "stall.txt").write_text(f"{stall:.1f}\n")
    assert stall <= bound + 5, f"stalled {stall:.1f}s (keepalive bound {bound:.0f}s)"


# ----- streams that never register ------------------------------------------------------------------------
def test_streams_that_never_register_are_bounded_in_number_and_time(start_live_server):
    """The issue's measurement: 300 Train streams that never sent Register stayed open, with no deadline and
    no limit on their number. Now at most --max-pending are open at once (the next is refused at once), and
    each is closed --first-message-timeout seconds after it opened."""
    import threading

    import grpc

    from ormo_ps.common.pb import parameter_server_pb2 as pb
    from ormo_ps.server.config import RunConfig
    from tests.conftest import RawWorker

    run = RunConfig(workers=1, dataset="digits", model="mlp", batch_size=32, iterations=50)
    live, stop_server = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0,
                                          first_message_timeout=2.0, max_pending=3)
    hold = threading.Event()

    def silent():  # opens the stream, sends nothing
        hold.wait(30)
        yield from ()

    train = live.channel().stream_stream("/ps.v1.ParameterServer/Train",
                                         request_serializer=pb.WorkerMessage.SerializeToString,
                                         response_deserializer=pb.ServerMessage.FromString)
    worker = None
    try:
        opened = time.monotonic()
        calls = [train(silent(), timeout=30) for _ in range(3)]
        for _ in range(200):  # until the server has them all (bounded: 10 s)
            if live.on_loop(lambda: live.service._pending) == 3:
                break
            time.sleep(0.05)
        assert live.on_loop(lambda: live.service._pending) == 3
        with pytest.raises(grpc.RpcError) as refused:
            next(train(silent(), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 Train streams have not registered yet (at most 3 at once)" in refused.value.details()
        for call in calls:
            with pytest.raises(grpc.RpcError) as closed:
                next(call)
            assert closed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no Register within 2s of opening the stream" in closed.value.details()
        assert 2.0 <= time.monotonic() - opened < 15.0
        for _ in range(200):  # (the handler ends just after the status it sent: bounded wait, 10 s)
            if live.on_loop(lambda: live.service._pending) == 0:
                break
            time.sleep(0.05)
        assert live.on_loop(lambda: live.service._pending) == 0
        worker = RawWorker(live.stub())  # a real worker gets in afterwards
        assert worker.register().worker_id == 0
    finally:
        hold.set()
        if worker is not None:
            worker.close()
        stop_server()
