"""Worker and server faults: silent workers leave a synchronous barrier, a killed server resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from ormo_ps.common.codec import encode
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.server.serving import listening_port
from ormo_ps.server.config import RunConfig
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import RawWorker

ROOT = Path(__file__).resolve().parents[1]


def gradient(numel: int, index: int) -> pb.WorkerMessage:
    msg = pb.WorkerMessage(gradient=pb.Gradient(iteration_index=index, loss=1.0, sample_count=32))
    encode(torch.full((numel,), 0.01), out=msg.gradient.tensor)
    return msg


def test_a_silent_worker_is_dropped_from_the_synchronous_barrier_and_rejoins(start_live_server):
    run = RunConfig(algo="ssgd", workers=2, dataset="digits", model="mlp", batch_size=32, iterations=1000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, sync_timeout=0.5)
    workers = []
    try:
        a, b = RawWorker(live.stub()), RawWorker(live.stub())
        workers += [a, b]
        n = a.register().config.num_parameters
        b.register()
        a.ready()
        b.ready()
        assert a.parameters().iteration_index == 0 and b.parameters().iteration_index == 0
        a.send(gradient(n, 0))
        started = time.monotonic()
        p = a.parameters()  # b is silent: after the timeout the round completes with a alone
        assert p.iteration_index == 1 and time.monotonic() - started >= 0.4
        assert live.on_loop(lambda: live.service.counters.dropped_workers) == 1
        b.send(gradient(n, 0))  # b wakes up: it is no longer in the run
        assert b.expect_abort().code() == grpc.StatusCode.FAILED_PRECONDITION
        back = RawWorker(live.stub())
        workers.append(back)
        back.register(worker_id=1)
        back.ready()
        assert back.parameters().iteration_index == 1  # rejoins with the current index
        a.send(gradient(n, 1))
        back.send(gradient(n, 1))
        assert a.parameters().iteration_index == 3 and back.parameters().iteration_index == 3
    finally:
        for w in workers:
            w.close()
        stop()


def test_truncated_or_corrupt_checkpoints_are_refused(tmp_path):
    state = {"w": torch.arange(10.0), "iteration": 3, "run": {"algo": "ormo", "lr_milestones": [1.0, 2.0]}}
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert load_checkpoint(tmp_path)["iteration"] == 3
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "truncated.pt")
    flipped = bytearray(data)
    at = bytes(data).index(torch.arange(10.0).numpy().tobytes()) + 13  # inside the tensor's bytes
    flipped[at] ^= 0x40
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(tmp_path / "flipped.pt")
    (tmp_path / "header.pt").write_bytes(b"ORMO-PS-CKPT 1\n" + b"0" * 20)
    with pytest.raises(CheckpointError, match="header is incomplete"):
        load_checkpoint(tmp_path / "header.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an OrMo-PS checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_checkpoint_is_a_plain_torch_file_and_the_first_format_still_loads(tmp_path):
    import hashlib
    import io

    state = {"core": {"w": torch.ones(3), "iteration": 7}, "run": {"algo": "asgd"}}
    saved = torch.load(save_checkpoint(tmp_path / "checkpoint.pt", state), weights_only=True)
    assert saved["format"] == "ormo-ps-checkpoint" and saved["state"]["core"]["iteration"] == 7
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    (tmp_path / "v1.pt").write_bytes(b"ORMO-PS-CKPT 1\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
                                     + payload)
    assert torch.equal(load_checkpoint(tmp_path / "v1.pt")["core"]["w"], torch.ones(3))


def test_a_checkpoint_with_objects_beyond_tensors_is_refused_without_running_them(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"format": "ormo-ps-checkpoint", "x": Evil()}))
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_ps_server_refuses_a_corrupt_checkpoint_with_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 a torn file")
    r = subprocess.run([sys.executable, "-m", "ormo_ps.server.cli", "--resume", str(tmp_path), "--bind", "127.0.0.1:0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_after_sigkill_and_resume_workers_reconnect_by_themselves(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONUNBUFFERED": "1"}
    args = ["--algo", "ormo", "--workers", "2", "--dataset", "digits", "--model", "mlp", "--batch-size", "32",
            "--iterations", "4000", "--out", str(tmp_path), "--checkpoint-every", "0.3", "--linger", "0"]
    procs: list[subprocess.Popen] = []

    def start(*argv: str, log: Path | None = None) -> subprocess.Popen:
        # Workers log to files: a pipe nobody reads would fill up and block them.
        out = open(log, "w") if log else subprocess.PIPE
        p = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, text=True,
                             stdout=out, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def port_of(p: subprocess.Popen) -> int:
        for _ in range(200):
            port = listening_port(p.stdout.readline())
            if port is not None:
                return port
        raise AssertionError("no port")

    def iteration(port: int) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS) as ch:
            return pb_grpc.ParameterServerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5).iteration

    try:
        server = start("ormo_ps.server.cli", *args, "--bind", "127.0.0.1:0")
        port = port_of(server)
        logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        # The second worker is slow: it is nearly always computing (sleeping) when the server dies, so its
        # next write meets a finished stream, which must read as a lost server, not crash the worker.
        workers = [start("ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1", "--server-timeout", "60",
                         *slow, log=log) for log, slow in zip(logs, ([], ["--slowdown", "200"]))]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until a checkpoint past iteration 150 is on disk
            time.sleep(0.1)
            try:
                if load_checkpoint(tmp_path)["core"]["iteration"] >= 150:
                    break
            except CheckpointError:
                pass
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        saved = load_checkpoint(tmp_path)["core"]["iteration"]
        assert 150 <= saved < 4000
        # the same address again: the workers are retrying it
        server2 = start("ormo_ps.server.cli", *args, "--bind", f"127.0.0.1:{port}", "--resume", str(tmp_path))
        assert port_of(server2) == port
        assert server2.wait(120) == 0
        for w, log in zip(workers, logs):
            assert w.wait(30) == 0
            assert "STOP_REASON_DONE" in log.read_text() and "Traceback" not in log.read_text()
        assert torch.load(tmp_path / "final.pt")["iteration"] == 4000
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
