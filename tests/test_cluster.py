"""Training runs on a real Slurm cluster of network namespaces (tests/slurm_cluster.py), submitted with the
project's batch script (deploy/slurm/ormo-ps.sbatch) as a user would: a 3-node job trains to the end, a
worker node's link cut and restored (its workers rejoin), a worker node lost (the job goes on), the server's
node lost (the job is requeued and resumes from its checkpoint).

`make test-cluster` runs these (as root; it installs Debian's slurm-wlm and munge when missing). The plain
test command skips them: they install system packages and take a few minutes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ormo_ps.common.grpc_options import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from ormo_ps.common.metrics import read_metrics
from ormo_ps.server.checkpoint import CheckpointError, load_checkpoint
from tests.slurm_cluster import Cluster, install, unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "ormo-ps.sbatch"
ENABLE = "ORMO_TEST_CLUSTER"


def make_cluster(nodes: int, slurmd_timeout: int) -> Iterator[Cluster]:
    if os.environ.get(ENABLE) != "1":
        pytest.skip(f"Slurm cluster tests run with `make test-cluster` (or {ENABLE}=1): they need root and "
                    "install slurm-wlm and munge")
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    install()
    with Cluster(nodes=nodes, slurmd_timeout=slurmd_timeout) as cluster:
        yield cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from make_cluster(nodes=3, slurmd_timeout=30)


def run_variables(out: Path, **settings: str) -> dict[str, str]:
    """The job's settings: the embedded default job (digits, MLP), its results in `out` (shared storage)."""
    return {"PS_WORKERS": "4", "PS_DATASET": "digits", "PS_MODEL": "mlp", "PS_LINGER": "5", "PS_OUT": str(out),
            "ORMO_PS_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **settings}


def server_log(out: Path) -> str:
    path = out / "server.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition, timeout: float, what: str, diagnose=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s\n{diagnose()}")
        time.sleep(0.25)


def iteration(out: Path) -> int:
    """The run's iteration from its latest checkpoint (written atomically), 0 before the first."""
    try:
        return load_checkpoint(out)["core"]["iteration"]
    except (CheckpointError, FileNotFoundError, EOFError, RuntimeError):
        return 0


def test_a_three_node_job_trains_to_the_end(cluster, tmp_path):
    out = tmp_path / "run"
    job = cluster.submit(SBATCH, run_variables(out, PS_ITERATIONS="600"))
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, cluster.job_output(job))
    assert info["NodeList"] == "node[1-3]"
    records = read_metrics(out / "metrics.jsonl")
    summary = [r for r in records if r["event"] == "summary"][-1]
    assert summary["iterations"] == summary["gradients_applied"] == 600
    final = [r for r in records if r["event"] == "eval"][-1]
    assert final["iteration"] == 600 and final["test_accuracy"] > 0.9
    # Each worker ran on a worker node, under its node's hostname, and reached the server by node1's address.
    log = server_log(out)
    hosts = {m.group(1) for m in re.finditer(r"registered \((node\d)-\d+,", log)}
    assert hosts == {"node2", "node3"}, log[-3000:]
    assert (out / "evaluator.log").read_text().count(f"[server {cluster.address('node1')}:50051]") > 0


def test_a_sharded_job_across_nodes_gives_the_simulators_parameters(cluster, tmp_path):
    """PS_SHARDS=2: the shards on node2 and node3, the coordinator on node1, one worker: its arrival order is
    the simulator's, so the final parameters, put together from two machines' shards, are the simulator's bit
    for bit."""
    from ormo_ps.server.config import RunConfig
    from ormo_ps.sim.simulator import Simulator

    out = tmp_path / "run"
    settings = dict(PS_WORKERS="1", PS_SHARDS="2", PS_ITERATIONS="60", PS_SEED="5", PS_BATCH_SIZE="32",
                    PS_LR="0.05", PS_ALGO="ormo-da", PS_THREADS="1")
    job = cluster.submit(SBATCH, run_variables(out, **settings))
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, cluster.job_output(job))
    log = server_log(out)
    assert f"{cluster.address('node2')}:50061 [0, " in log and f"{cluster.address('node3')}:50062 [" in log, log[-3000:]
    served = torch.load(out / "final.pt", weights_only=True)
    run = RunConfig(algo="ormo-da", workers=1, dataset="digits", model="mlp", batch_size=32, lr=0.05, iterations=60,
                    seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulated = Simulator(run, eval_every=None, final_eval=False).simulate().params
    finally:
        torch.set_num_threads(threads)
    assert served["iteration"] == 60 and torch.equal(served["params"], simulated)
    state = load_checkpoint(out)
    assert [Path(s["path"]).name for s in state["shards"]] == ["shard-0-of-2.pt", "shard-1-of-2.pt"]


def test_a_job_whose_workers_cannot_start_fails_instead_of_waiting(cluster, tmp_path):
    """Workers that exit at once (here: a setting they refuse) leave a server with nobody to train: the script
    stops it and the job fails, with the reason in its output, instead of holding the nodes until the limit."""
    out = tmp_path / "run"
    job = cluster.submit(SBATCH, run_variables(out, PS_ITERATIONS="600", PS_SERVER_TIMEOUT="-5"))
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 180)
    assert info["JobState"] == "FAILED", (info, cluster.job_output(job))
    assert "every worker ended before the run did" in cluster.job_output(job)
    assert "Invalid value" in (out / "worker-0.log").read_text()


@pytest.fixture
def patient_cluster() -> Iterator[Cluster]:
    """A controller that waits two minutes before declaring a silent node down (Slurm's default is five)."""
    yield from make_cluster(nodes=3, slurmd_timeout=120)


def test_a_worker_node_cut_off_rejoins_when_its_link_returns(patient_cluster, tmp_path):
    """A link down for longer than gRPC's keepalive bound (both ends drop the dead streams) but shorter than
    Slurm's SlurmdTimeout: the run goes on with node2's workers; node3's workers register again once the link
    is back, and the run finishes with their gradients."""
    cluster = patient_cluster
    out = tmp_path / "run"
    iterations = 100_000
    job = cluster.submit(SBATCH, run_variables(out, PS_ITERATIONS=str(iterations), PS_CHECKPOINT_EVERY="0.5",
                                               PS_SLOW_WORKERS="4", PS_SLOWDOWN="3"))
    wait_for(lambda: len(re.findall(r"registered \(node3-", server_log(out))) == 2 and iteration(out) > 50, 120,
             "training with node3's two workers", lambda: cluster.job_output(job) + server_log(out)[-2000:])
    cut = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 8
    cluster.cut_link("node3")
    before = iteration(out)
    wait_for(lambda: len(re.findall(r"worker \d+ disconnected", server_log(out))) >= 2, cut + 10,
             "node3's workers dropped by the server", lambda: server_log(out)[-3000:])
    during = iteration(out)
    time.sleep(max(0.0, cut - 20))
    assert iteration(out) > during > before, "the run stalled while node3 was cut off"
    cluster.cut_link("node3", up=True)
    restored = time.monotonic()
    wait_for(lambda: len(re.findall(r"registered \(node3-", server_log(out))) >= 4, 60,
             "node3's workers registered again", lambda: server_log(out)[-3000:])
    rejoin_seconds = time.monotonic() - restored
    assert cluster.job(job)["JobState"] == "RUNNING"
    assert cluster.node_states()["node3"] not in ("down", "down*"), "Slurm declared the node down"
    cluster.run("scancel", "--batch", "--signal=TERM", job)  # the user's way to stop a run with a checkpoint
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    assert info["JobState"] == "COMPLETED", (info, cluster.job_output(job))
    print(f"\nnode3 cut {cut:.0f} s: the run went on ({before} -> {during} iterations while the server dropped "
          f"node3's streams); its workers rejoined {rejoin_seconds:.1f} s after the link returned")


@pytest.fixture
def quick_cluster() -> Iterator[Cluster]:
    """Four nodes (one spare for a requeued job) and a controller that declares a silent node down in 10 s."""
    yield from make_cluster(nodes=4, slurmd_timeout=10)


def test_a_lost_worker_node_does_not_end_the_job(quick_cluster, tmp_path):
    """node3's slurmd and tasks SIGKILLed: Slurm declares it down and, the job being `--no-kill`, keeps the job
    running; the asynchronous run goes on with node2's workers and ends cleanly."""
    cluster = quick_cluster
    out = tmp_path / "run"
    job = cluster.submit(SBATCH, run_variables(out, PS_ITERATIONS="100000", PS_CHECKPOINT_EVERY="0.5",
                                               PS_SLOW_WORKERS="4", PS_SLOWDOWN="3"), "--nodes=3")
    info = cluster.wait_job(job, {"RUNNING"}, 60)
    lost = info["NodeList"].replace("node[", "node").split("-")[-1].rstrip("]")  # the last node: workers only
    lost = lost if lost.startswith("node") else f"node{lost}"
    wait_for(lambda: iteration(out) > 50, 120, "training", lambda: cluster.job_output(job))
    cluster.kill_node(lost)
    wait_for(lambda: cluster.node_states().get(lost, "").startswith("down"), 60, f"Slurm declaring {lost} down")
    before = iteration(out)
    wait_for(lambda: iteration(out) > before + 50, 60, "the run going on without the lost node")
    assert cluster.job(job)["JobState"] == "RUNNING"
    cluster.run("scancel", "--batch", "--signal=TERM", job)  # the user's way to stop a run with a checkpoint
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    assert info["JobState"] == "COMPLETED", (info, cluster.job_output(job))


def test_a_lost_server_node_requeues_the_job_which_resumes_from_its_checkpoint(quick_cluster, tmp_path):
    """node1 (the batch script, ps-server, ps-eval) SIGKILLed: Slurm requeues the `--requeue` job, which starts on
    the nodes left and resumes from the checkpoint on shared storage, losing only what came after it."""
    cluster = quick_cluster
    out = tmp_path / "run"
    iterations = 3000
    log_every = 5  # progress records this often: how far the run had got before the loss, within 5 iterations
    job = cluster.submit(SBATCH, run_variables(out, PS_ITERATIONS=str(iterations), PS_CHECKPOINT_EVERY="0.5",
                                               PS_SLOW_WORKERS="4", PS_SLOWDOWN="3", PS_LOG_EVERY=str(log_every)),
                         "--nodes=3")
    info = cluster.wait_job(job, {"RUNNING"}, 60)
    server_node = info["BatchHost"]
    wait_for(lambda: iteration(out) > 100, 120, "training", lambda: cluster.job_output(job))
    cluster.kill_node(server_node)
    lost_at = time.monotonic()
    checkpointed = iteration(out)
    assert checkpointed < iterations
    wait_for(lambda: cluster.job(job).get("Restarts") == "1", 90, "the job requeued",
             lambda: str(cluster.job(job)))
    # A requeued job waits (BeginTime) before it may start again; an operator (or a script) lets it go now.
    info = cluster.start_requeued(job, 120)
    assert server_node not in info["NodeList"]
    wait_for(lambda: "resuming from" in cluster.job_output(job), 60, "the resumed start")
    resumed_after = time.monotonic() - lost_at
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    assert info["JobState"] == "COMPLETED", (info, cluster.job_output(job))
    records = read_metrics(out / "metrics.jsonl")
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from_iteration"] == checkpointed
    summary = [r for r in records if r["event"] == "summary"][-1]
    assert summary["iterations"] == iterations
    second = records.index(starts[1])
    # The server reached at least its last progress record and its checkpoint, and fewer than log_every
    # iterations past that record.
    recorded = max(r["iteration"] for r in records[:second] if r["event"] == "progress")
    lost = (max(0, recorded - checkpointed), max(0, recorded + log_every - 1 - checkpointed))
    print(f"\nserver node lost: its last progress record before the loss said iteration {recorded} (records every "
          f"{log_every}); the new start resumed from the checkpoint at {checkpointed}: {lost[0]}-{lost[1]} "
          f"iterations lost (at most PS_CHECKPOINT_EVERY=0.5 s of training), {resumed_after:.0f} s after the "
          f"loss\n{(out / 'guard.log').read_text().strip()}")
