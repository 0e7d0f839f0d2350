"""Several hosts on one machine: a server and two workers in their own network namespaces, joined by a bridge.

The server listens on its namespace's address and the workers reach it by that address, as on a cluster.
Mid-run one worker's link is cut for longer than the gRPC keepalive needs to declare it dead, then
restored: the asynchronous run goes on with the other worker meanwhile, both ends drop the dead stream,
the cut worker registers again once its link is back, and the run finishes. Everything (namespaces,
bridge, processes) is created here with names unique to the run and removed at the end; no traffic
leaves these namespaces. Needs root and `ip netns`; skipped with the reason where the machine forbids it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ormo_ps.common.grpc_options import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from ormo_ps.server.checkpoint import CheckpointError, load_checkpoint
from ormo_ps.server.serving import LISTENING_PATTERN
from tests.logged_process import LoggedProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.250.0"  # only ever configured inside the namespaces this test creates
SERVER_ADDRESS = f"{SUBNET}.1"
ITERATIONS = 1500
# Both ends declare a silent peer dead after keepalive time + timeout (20 s), so the worker is already
# retrying when its link comes back and rejoins within its reconnect backoff (at most 5 s, x1.5 jitter).
# Without keepalive it would wait for TCP's next retransmission, which after a 30 s cut comes about 51 s
# after the cut: REJOIN_SECONDS tells the two apart.
CUT_SECONDS = max(30.0, (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 5)
REJOIN_SECONDS = 15.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"ormo-probe-{secrets.token_hex(3)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@dataclass
class Hosts:
    server: str
    workers: list[str]
    bridge: str


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Namespaces ormo-srv-X, ormo-w1-X, ormo-w2-X, each with eth0 on a bridge in ormo-br-X (10.250.0.0/24)."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    h = Hosts(server=f"ormo-srv-{tag}", workers=[f"ormo-w1-{tag}", f"ormo-w2-{tag}"], bridge=f"ormo-br-{tag}")
    made: list[str] = []
    try:
        for ns in (h.bridge, h.server, *h.workers):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        try:
            ip("-n", h.bridge, "link", "add", "br0", "type", "bridge")
            ip("-n", h.bridge, "link", "set", "br0", "up")
            for i, ns in enumerate((h.server, *h.workers), start=1):
                # one end on the bridge, the other born inside the host's namespace: nothing in ours
                ip("-n", h.bridge, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("-n", h.bridge, "link", "set", f"port{i}", "master", "br0", "up")
                ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot build the virtual network here: {' '.join(e.cmd)}: {e.stderr.strip()}")
        yield h
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its interfaces and the bridge
            ip("netns", "del", ns, check=False)


class Host(LoggedProcess):
    """A process in a namespace, its output collected line by line."""

    def __init__(self, ns: str, name: str, argv: list[str], log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        # `ip netns exec` execs the command: the process we hold is python itself
        super().__init__(name, ["ip", "netns", "exec", ns, sys.executable, *argv], env, ROOT, log)


@pytest.fixture
def processes() -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(10)


def progress(out: Path) -> tuple[int, list[int]]:
    """(iteration, gradients applied per worker) from the server's latest checkpoint (written atomically)."""
    for _ in range(50):
        try:
            core = load_checkpoint(out)["core"]
            return core["iteration"], [w["gradients_applied"] for w in core["workers"]]
        except (CheckpointError, FileNotFoundError, EOFError, RuntimeError):
            time.sleep(0.1)
    raise AssertionError(f"no readable checkpoint in {out}")


def test_a_cut_worker_rejoins_across_namespaces_and_the_run_finishes(hosts, processes, tmp_path):
    out = tmp_path / "server"
    server = Host(hosts.server, "server", [
        "-m", "ormo_ps.server.cli", "--bind", f"{SERVER_ADDRESS}:0", "--workers", "2", "--dataset", "digits",
        "--model", "mlp", "--iterations", str(ITERATIONS), "--out", str(out), "--linger", "0",
        "--log-every", "10", "--checkpoint-every", "0.25"], tmp_path / "server.log")
    processes.append(server)
    m = server.wait_for(LISTENING_PATTERN, 60)
    assert m.group(1) == SERVER_ADDRESS
    port = int(m.group(2))

    # w1 is the one to cut; w2, slowed down, keeps the run going meanwhile without finishing it.
    workers = {}
    for ns, name, slowdown in ((hosts.workers[0], "w1", "1"), (hosts.workers[1], "w2", "100")):
        workers[name] = Host(ns, name, [
            "-m", "ormo_ps.worker.cli", "--server", f"{SERVER_ADDRESS}:{port}", "--threads", "1", "--server-timeout", "60",
            "--name", name, "--slowdown", slowdown], tmp_path / f"{name}.log")
        processes.append(workers[name])
    cut_id = int(server.wait_for(r"worker (\d+) registered \(w1,", 60).group(1))
    server.wait_for(r"iter (?:[3-9]\d|\d{3,})/", 60)  # training, with w1 among the workers

    ip("-n", hosts.workers[0], "link", "set", "eth0", "down")
    cut_at = time.monotonic()
    time.sleep(2.0)
    it_a, per_worker_a = progress(out)
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    it_b, per_worker_b = progress(out)
    ip("-n", hosts.workers[0], "link", "set", "eth0", "up")
    restored_at = time.monotonic()

    assert it_b > it_a, f"the run stalled while one link was down ({it_a} -> {it_b})"
    assert per_worker_b[cut_id] == per_worker_a[cut_id], "gradients arrived over a link that was down"
    assert it_b < ITERATIONS, "the run ended during the cut: nothing left to rejoin"
    # The server dropped the dead stream (keepalive), so the worker comes back by registering again.
    assert server.find_all(rf"worker {cut_id} disconnected"), server.output()[-3000:]
    server.wait_for(rf"worker {cut_id} registered \(w1,", REJOIN_SECONDS + 5, count=2)
    rejoin_seconds = time.monotonic() - restored_at
    assert rejoin_seconds <= REJOIN_SECONDS, f"w1 took {rejoin_seconds:.1f}s to rejoin"

    try:
        server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(server.output()[-4000:]) from None
    assert server.proc.returncode == 0, server.output()[-3000:]
    assert server.find_all(rf"run finished at iteration {ITERATIONS}\b")
    for name, w in workers.items():
        assert w.proc.wait(timeout=30) == 0, w.output()[-3000:]
        assert json.loads(w.output().strip().splitlines()[-1])["stop_reason"] == "STOP_REASON_DONE", name
    final_iteration, per_worker = progress(out)
    assert final_iteration == ITERATIONS
    assert per_worker[cut_id] > per_worker_b[cut_id], "the rejoined worker contributed nothing"


def test_a_silent_half_open_link_stalls_a_synchronous_run_no_longer_than_the_keepalive_bound(hosts, processes,
                                                                                              tmp_path):
    """A synchronous run waits for every worker: a link that goes silent (no RST, packets just vanish)
    stalls it until the server declares the stream dead. The README promises about 20 s (keepalive time +
    timeout); this measures the stall (issue #11, item 5)."""
    out = tmp_path / "server"
    server = Host(hosts.server, "server", [
        "-m", "ormo_ps.server.cli", "--bind", f"{SERVER_ADDRESS}:0", "--algo", "ssgd", "--workers", "2", "--dataset",
        "digits", "--model", "mlp", "--iterations", "100000", "--out", str(out), "--linger", "0", "--log-every", "10",
        "--sync-timeout", "600"], tmp_path / "server.log")
    processes.append(server)
    m = server.wait_for(LISTENING_PATTERN, 60)
    port = int(m.group(2))
    for ns, name in ((hosts.workers[0], "w1"), (hosts.workers[1], "w2")):
        processes.append(Host(ns, name, ["-m", "ormo_ps.worker.cli", "--server", f"{SERVER_ADDRESS}:{port}", "--threads", "1",
                                         "--server-timeout", "120", "--name", name], tmp_path / f"{name}.log"))
    cut_id = int(server.wait_for(r"worker (\d+) registered \(w1,", 60).group(1))
    server.wait_for(r"iter (?:[3-9]\d|\d{3,})/", 60)
    # Drop w1's packets silently in both directions: its socket sees neither data nor a reset.
    ip("netns", "exec", hosts.workers[0], "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", "100%",
       check=False)
    ip("-n", hosts.workers[0], "link", "set", "eth0", "down")
    cut_at = time.monotonic()
    server.wait_for(rf"worker {cut_id} disconnected", 120)
    stall = time.monotonic() - cut_at
    bound = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
    (tmp_path / "stall.txt").write_text(f"{stall:.1f}\n")
    print(f"stall: {stall:.1f}s (keepalive bound {bound:.0f}s)")
    assert stall <= bound + 5, f"the synchronous run stalled {stall:.1f}s on a silent link"
