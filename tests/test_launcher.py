"""ps-launch as a user meets it, with real processes on loopback: signals reach every process it started, and a
process that fails says why on the console."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ormo_ps.common.metrics import read_metrics
from ormo_ps.launcher.cli import error_line
from ormo_ps.sim.cli import main as sim_main
from tests.test_launch import wait_until
from ormo_ps.worker.cli import main as worker_main
from ormo_ps.worker.evaluator import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ormo_ps.launcher.cli", *args], env=env or ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, as {pid: start time} (the start time tells a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def progress_records(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(r["event"] == "progress" for r in read_metrics(path)) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_signal_to_ps_launch_stops_every_process_it_started(sig, tmp_path):
    """As torchrun: the signal is passed on to the server, the workers and the evaluator, and ps-launch exits
    only once none of them runs (no orphans training on); the server checkpoints on the way. SIGKILL cannot
    be passed on: the kernel sends each process SIGTERM when ps-launch dies (Linux)."""
    launcher = launch("--workers", "2", "--epochs", "2000", "--batch-size", "32", "--out", str(tmp_path), "-q",
                      "--timeout", "300")
    try:
        wait_until(lambda: progress_records(tmp_path) >= 2, 120, "the run to train")
        kids = children(launcher.pid)
        assert len(kids) == 4, kids  # the server, two workers, the evaluator
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    if sig == signal.SIGKILL:  # nobody waits for the orphans: they stop on their own, soon
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(alive(pid, started) for pid, started in kids.items()), 30, "the orphans")
    survivors = [pid for pid, started in kids.items() if alive(pid, started)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"ps-launch left processes running: {survivors}"
    if sig == signal.SIGKILL:
        assert launcher.returncode == -signal.SIGKILL
    else:
        assert launcher.returncode == 128 + sig
        assert signal.Signals(sig).name in err and "Traceback" not in err
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_diverged_run_ends_ps_launch_with_code_3_as_ps_server(tmp_path):
    """ps-server exits 3 on a diverged run; ps-launch, which stops it after the evaluator's last evaluation,
    used to exit 0 all the same, or 1 when a worker told of the divergence exited (3) first. Either way: 3."""
    result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--workers", "2", "--lr", "50",
                             "--iterations", "2000", "--out", str(tmp_path), "-q"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "diverged" in result.stderr.splitlines()[0] and result.stderr.startswith("Error: ")


@pytest.mark.slow
def test_a_server_that_cannot_start_says_why_on_the_console(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--dataset", "cifar10", "--data-dir",
                             str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "-q"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "server exited with code 1" in result.stderr
    assert f"{tmp_path / 'nowhere'} does not exist" in result.stderr  # the server's own words
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_port_in_use_is_named_on_the_console(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--port", str(port), "--out", str(tmp_path),
                                 "-q"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert error_line(tmp_path / "server.log") in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_worker_that_fails_stops_the_run_with_its_error(tmp_path):
    """PS_DEVICE (no option of ps-launch) reaches the workers and the evaluator: a device this machine lacks
    is their usage error, and ps-launch shows it instead of waiting for workers that never come."""
    result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--out", str(tmp_path), "-q", "--timeout", "120"],
                            env=ENV | {"PS_DEVICE": "tpu"}, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "exited with code 2" in result.stderr
    assert "'tpu' is not a device" in result.stderr


def test_error_line_prefers_the_error_then_the_exception_then_the_last_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO starting\nError: cifar10: /data does not exist\n")
    assert error_line(log) == "cifar10: /data does not exist"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "RuntimeError: Failed to bind to address 127.0.0.1:5\n")
    assert error_line(log) == "RuntimeError: Failed to bind to address 127.0.0.1:5"
    log.write_text("INFO one\nINFO two\n\n")
    assert error_line(log) == "INFO two"
    assert error_line(tmp_path / "missing.log") == "(its log is empty)"


@pytest.mark.parametrize("main", [sim_main, worker_main, eval_main], ids=["ps-sim", "ps-worker", "ps-eval"])
@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_an_unknown_or_missing_device_is_a_usage_error(main, device, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as info:
        main(["--device", device])
    assert info.value.code == 2
    assert "Invalid value for '--device'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_launch_evaluates_along_the_run_and_shows_progress(tmp_path):
    """The default run trains for about a second: the evaluator, started first and polling often, still
    evaluates several times along it, so ps-plot draws a curve; the console shows progress with rate."""
    result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--out", str(tmp_path)], env=ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "eval"]
    assert len(epochs) >= 3 and epochs == sorted(epochs) and epochs[-1] == 30.0, epochs
    assert "the evaluator evaluates the final parameters" in result.stderr
    assert re.search(r"iter 330/330 \(100%\) epoch 30\.00 .* \| [\d.]+ it/s, \S+ elapsed, done", result.stderr)


def test_a_process_whose_launcher_is_gone_before_it_asks_stops_at_once(tmp_path):
    """common/parent.py: a ps-* process started by a ps-launch that died before the process could ask for its
    death signal (its parent is no longer that ps-launch) stops with SIGTERM at once; the variable naming the
    launcher is not passed on; without it nothing happens."""
    from ormo_ps.common.parent import PARENT_VARIABLE

    code = ("import os, time; from ormo_ps.common.parent import die_with_parent, PARENT_VARIABLE; "
            "die_with_parent(); print(PARENT_VARIABLE in os.environ, flush=True); time.sleep(30)")
    orphan = subprocess.run([sys.executable, "-c", code], env=ENV | {PARENT_VARIABLE: "1"}, capture_output=True,
                            text=True, timeout=60)
    assert orphan.returncode == -signal.SIGTERM and orphan.stdout == ""
    child = subprocess.Popen([sys.executable, "-c", code], env=ENV | {PARENT_VARIABLE: str(os.getpid())},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "False"  # asked, and the variable is gone
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
