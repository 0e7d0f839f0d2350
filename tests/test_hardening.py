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

from server.cli import listening_port

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
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ----- 2: a port in use --------------------------------------------------------------------------------
def test_a_second_server_on_a_port_in_use_is_a_one_line_error(tmp_path):
    first_log = tmp_path / "a.log"
    first = start("server.cli", *RUN, "--iterations", "1000", "--bind", "127.0.0.1:0", "--out", str(tmp_path / "a"),
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
    worker = subprocess.run([sys.executable, "-m", "worker.cli", "--token", "", "--server", "127.0.0.1:1"], cwd=ROOT,
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


def big_request(megabytes: int) -> bytes:
    """A GetParametersRequest carrying `megabytes` MB in an unknown field (field 100, length-delimited)."""
    size = megabytes << 20

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(100 << 3 | 2) + varint(size) + bytes(size)


def call_with(port: int, payload: bytes, token: str | None) -> "grpc.StatusCode":
    import grpc

    from common.grpc_options import GRPC_MESSAGE_OPTIONS

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
    server = start("server.cli", *RUN, "--iterations", "1000", "--bind", "127.0.0.1:0", "--out", str(tmp_path),
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
