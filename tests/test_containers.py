"""The image and the compose file for real: build the image, `docker compose up` a small run, read its results.

Needs a running Docker engine with Compose v2 (`make test-containers` provides both and runs this file);
skipped with the reason otherwise. The build uses Docker's layer cache (deploy/build-image.sh, as
`make image`). The run is K=4 on digits through the repository's docker-compose.yml, in a compose project of
its own that is removed afterwards, volumes included; its traffic stays on that project's network. Then the
same with a sharded server: docker-compose.yml plus deploy/compose.sharded.yml (2 shard containers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.containers]
ROOT = Path(__file__).resolve().parents[1]
PROJECT = "ormo-ps-test"
# Long enough (1-2 s of training on the 2-core test machine) that every worker gets the CPU and sends
# gradients: with 200 iterations (0.2 s) a worker the scheduler reached late sent none (2 runs of 8).
ITERATIONS = 2000
RUN_ENV = [f"PS_ITERATIONS={ITERATIONS}", "PS_BATCH_SIZE=32", "PS_LR=0.02"]


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (make test-containers installs and starts an engine)"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker engine answers (make test-containers starts one: deploy/docker-host.sh)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker Compose v2 (`docker compose`; deploy/docker-host.sh installs it)"
    return None


@pytest.fixture(scope="module")
def compose_bench():
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    from bench import containers

    return containers


@pytest.fixture(scope="module")
def image(compose_bench) -> str:
    build = subprocess.run([str(ROOT / "deploy" / "build-image.sh")], cwd=ROOT, capture_output=True, text=True,
                           timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    return "ormo-ps:0.1.0"


def test_image_runs_every_role_as_a_non_root_user(image):
    out = subprocess.run(["docker", "run", "--rm", image, "sh", "-c",
                          "id -u && ps-server --help >/dev/null && ps-worker --help >/dev/null && "
                          "ps-eval --help >/dev/null && ps-shard --help >/dev/null && "
                          "python /app/deploy/healthcheck.py --help >/dev/null && "
                          "test -w /runs && test -w $ORMO_PS_CACHE && echo ok"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    uid, ok = out.stdout.split()
    assert uid == "10001" and ok == "ok"


def test_compose_up_trains_four_workers_and_leaves_the_results_on_the_volume(image, compose_bench, tmp_path):
    args = compose_bench.parse_args(["hom", "--workers", "4", "--project", PROJECT, "--out", str(tmp_path),
                                     "--stats-every", "2", "--run-timeout", "900", "--keep",
                                     "--env", *RUN_ENV])
    compose = compose_bench.Compose(PROJECT, {}, print)
    try:
        result = compose_bench.run_scenario(args)
        runs = compose.copy_runs(tmp_path / "runs")
        final = torch.load(runs / "final.pt", weights_only=True)
    finally:
        compose("down", "-v", "--remove-orphans", quiet=True, check=False)
    assert result["containers_exited_0"] == 6 and not result["containers_exited_non_zero"]  # server, 4, evaluator
    assert result["iterations"] == result["gradients_applied"] == ITERATIONS and result["gradients_rejected"] == 0
    assert sum(result["gradients_per_worker"]) == ITERATIONS and all(g > 0 for g in result["gradients_per_worker"])
    assert result["final_test_accuracy"] > 0.6  # chance is 0.1
    assert {"metrics.jsonl", "checkpoint.pt", "final.pt"} <= set(result["files"])
    assert final["iteration"] == ITERATIONS and torch.isfinite(final["params"]).all()
    assert result["memory"]["per_service"]["worker"]["containers"] == 4
    assert json.loads((tmp_path / "hom.json").read_text())["iterations"] == ITERATIONS


def test_compose_up_with_two_shards_trains_and_each_shard_writes_its_checkpoint(image, compose_bench, tmp_path):
    """docker-compose.yml + deploy/compose.sharded.yml: the server coordinates shard-0 and shard-1 (healthy
    first), the workers reach them by their service names, each shard writes its slice to the shared volume."""
    args = compose_bench.parse_args(["hom", "--workers", "4", "--sharded", "--project", PROJECT, "--out",
                                     str(tmp_path), "--stats-every", "2", "--run-timeout", "900", "--keep",
                                     "--env", *RUN_ENV, "PS_LINGER=30"])
    compose = compose_bench.Compose(PROJECT, {}, print, (compose_bench.COMPOSE_FILE, compose_bench.SHARDED_FILE))
    try:
        result = compose_bench.run_scenario(args)
        runs = compose.copy_runs(tmp_path / "runs")
        server_log = compose.server_log()
    finally:
        compose("down", "-v", "--remove-orphans", quiet=True, check=False)
    assert result["shards"] == 2
    # server, 4 workers, evaluator, and the 2 shards (stopped once the others had exited: they serve until then)
    assert result["containers_exited_0"] == 8 and not result["containers_exited_non_zero"]
    assert "attached 2 shards: shard-0:50061 [0, " in server_log
    assert result["iterations"] == result["gradients_applied"] == ITERATIONS and result["gradients_rejected"] == 0
    assert all(g > 0 for g in result["gradients_per_worker"])
    assert result["final_test_accuracy"] > 0.6
    assert sorted(p.name for p in (runs / "shards").iterdir()) == ["shard-0-of-2.pt", "shard-1-of-2.pt"]
    assert result["memory"]["per_service"]["shard-0"]["containers"] == 1
