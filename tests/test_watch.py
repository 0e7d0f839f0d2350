"""Watching a run while it trains, as an operator and a researcher do: a live ps-launch run's server and worker
scraped over HTTP (the counters move, and at the end they agree with metrics.jsonl), and its TensorBoard
events read while it still runs (the progress records, with metrics.jsonl's values). Real processes on
loopback; every wait is bounded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ormo_ps.common import live_tensorboard
from ormo_ps.common.live_tensorboard import LiveTensorBoard, TensorBoardError
from ormo_ps.common.metrics import MetricsWriter, read_metrics
from ormo_ps.launcher.cli import TARGETS_FILE
from ormo_ps.sim.cli import main as sim_main
from tests.test_launch import wait_until
from tests.test_launcher import ENV, ROOT, children, launch
from tests.test_observe import parse

TOKEN = "a-token-no-metrics-page-may-show-7f3c"  # the run's shared secret (PS_TOKEN)


def targets(out: Path) -> dict[str, str]:
    """{process name: its metrics URL} from ps-launch's file_sd targets (empty until it is written)."""
    try:
        entries = json.loads((out / TARGETS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {e["labels"]["process"]: f"http://{e['targets'][0]}/metrics" for e in entries}


def evaluator_pid(launcher: int) -> int:
    for pid in children(launcher):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"ormo_ps.worker.evaluator" in f.read():
                return pid
    raise AssertionError("ps-launch started no evaluator")


def summary_of(out: Path) -> dict | None:
    path = out / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return next((r for r in records if r["event"] == "summary"), None)


def try_scrape(url: str) -> tuple[dict[str, float], str] | None:
    """The page's samples and its text, None while the process does not answer (yet, or any more)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return parse(text), text


@pytest.mark.slow
def test_a_live_launch_is_scraped_and_its_counters_agree_with_metrics_jsonl(tmp_path):
    """The server's and a worker's counters move while the run trains; at the end (the evaluator held back, so
    the server lingers for it) the server's agree exactly with the run's summary record; no page shows the
    token. Then the evaluator goes on and the run ends as usual."""
    out = tmp_path / "run"
    launcher = launch("--workers", "2", "--epochs", "600", "--out", str(out), "--metrics-port", "0", "-q",
                      "--timeout", "300", env=ENV | {"PS_TOKEN": TOKEN})
    evaluator = None
    try:
        wait_until(lambda: {"server", "worker-0", "evaluator"} <= targets(out).keys(), 120, "the metrics targets")
        urls = targets(out)
        evaluator = evaluator_pid(launcher.pid)
        os.kill(evaluator, signal.SIGSTOP)  # it cannot fetch the final parameters: the server lingers for it

        seen: dict[str, list[float]] = {"server": [], "worker-0": []}
        counter = {"server": "ormo_ps_server_gradients_applied_total",
                   "worker-0": "ormo_ps_worker_gradients_computed_total"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(len(set(v) - {0.0}) >= 2 for v in seen.values()):
            for name, values in seen.items():
                page = try_scrape(urls[name])
                if page is not None:
                    samples, text = page
                    values.append(samples[counter[name]])
                    assert TOKEN not in text, name
            time.sleep(0.1)
        for name, values in seen.items():
            assert len(set(values) - {0.0}) >= 2, f"{name}'s counter did not move while the run trained: {values}"
            assert values == sorted(values), name  # counters only grow
        worker, _ = try_scrape(urls["worker-0"]) or ({}, "")
        if worker:  # (it may have finished meanwhile)
            assert worker["ormo_ps_worker_compute_seconds_count"] == worker["ormo_ps_worker_gradients_computed_total"]
            assert worker["ormo_ps_worker_id"] in (0, 1)

        wait_until(lambda: summary_of(out) is not None, 240, "the end of the run")
        summary = summary_of(out)
        final, text = try_scrape(urls["server"])
        assert TOKEN not in text
        applied = final["ormo_ps_server_gradients_applied_total"]
        assert applied == summary["gradients_applied"] == summary["iterations"]
        assert final["ormo_ps_server_iteration"] == summary["iterations"]
        assert final["ormo_ps_server_run_done"] == 1
        assert final["ormo_ps_server_staleness_iterations_count"] == applied
        assert final["ormo_ps_server_staleness_iterations_sum"] == pytest.approx(summary["staleness_mean"] * applied,
                                                                                  abs=applied * 1e-4)
        per_worker = [final[f'ormo_ps_server_worker_gradients_applied_total{{worker="{k}"}}'] for k in range(2)]
        assert per_worker == summary["gradients_per_worker"]
        rejected = sum(v for k, v in final.items() if k.startswith("ormo_ps_server_gradients_rejected_total"))
        assert rejected == summary["gradients_rejected"] == 0
        assert final["ormo_ps_server_received_bytes_total"] > applied * 4 * 9610  # every gradient's float32 values
        assert final["ormo_ps_server_checkpoints_written_total"] >= 1 and final["process_resident_memory_bytes"] > 0

        os.kill(evaluator, signal.SIGCONT)
        evaluator = None
        stdout, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["gradients_applied"] == applied
    finally:
        if evaluator is not None:
            os.kill(evaluator, signal.SIGCONT)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.slow
def test_tensorboard_shows_a_launched_run_while_it_trains(tmp_path):
    """TensorBoard's own event reader finds the server's progress records and the evaluator's evaluations in
    DIR/<run> and DIR/<run>/eval while ps-launch still runs, with the values metrics.jsonl holds."""
    out, tb = tmp_path / "run", tmp_path / "tb"
    launcher = launch("--workers", "2", "--epochs", "2000", "--out", str(out), "--tensorboard", str(tb), "-q",
                      "--timeout", "300")
    try:
        def events(folder: Path, tag: str) -> list:
            if not folder.is_dir():  # (not yet)
                return []
            accumulator = EventAccumulator(str(folder))
            accumulator.Reload()
            return accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []

        wait_until(lambda: len(events(tb / "run", "train/train_loss")) >= 3
                   and len(events(tb / "run" / "eval", "eval/test_accuracy")) >= 1, 120, "live TensorBoard events")
        assert launcher.poll() is None, "the run is still training"
        losses = events(tb / "run", "train/train_loss")
        accuracies = events(tb / "run" / "eval", "eval/test_accuracy")
        records = read_metrics(out / "metrics.jsonl")
        progress = {r["iteration"]: r for r in records if r["event"] == "progress"}
        evals = {r["iteration"]: r for r in records if r["event"] == "eval"}
        for e in losses:
            assert e.value == pytest.approx(progress[e.step]["train_loss"], rel=1e-6)  # float32 in the events
            assert e.wall_time == pytest.approx(progress[e.step]["timestamp"])
        for e in accuracies:
            assert e.value == pytest.approx(evals[e.step]["test_accuracy"], rel=1e-6)
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# ----- the live writer, in process ----------------------------------------------------------------
def test_the_live_writer_writes_what_metrics_jsonl_holds(tmp_path):
    folder = live_tensorboard.run_dir(tmp_path / "tb", tmp_path / "my-run")
    assert folder == tmp_path / "tb" / "my-run"
    with MetricsWriter(tmp_path / "metrics.jsonl", listeners=[LiveTensorBoard(folder)]) as metrics:
        metrics.write("start", source="server", config={"algo": "ormo"})
        metrics.write("progress", iteration=10, epoch=0.5, lr=0.1, train_loss=2.25, staleness_mean=1.5,
                      staleness_max=3)
        metrics.write("progress", iteration=20, epoch=1.0, lr=0.1, train_loss=None, staleness_mean=1.0,
                      staleness_max=2)
        metrics.write("eval", iteration=20, epoch=1.0, test_accuracy=0.75, test_loss=0.5, train_loss=float("nan"))
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/train_loss")] == [(10, 2.25)]  # null: left out
    assert [(e.step, e.value) for e in events.Scalars("train/staleness_max")] == [(10, 3), (20, 2)]
    assert [(e.step, e.value) for e in events.Scalars("eval/test_accuracy")] == [(20, 0.75)]
    assert "eval/train_loss" not in events.Tags()["scalars"]  # NaN is null in metrics.jsonl, and absent here
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert events.Scalars("train/lr")[0].wall_time == pytest.approx(records[1]["timestamp"])
    assert "config" in str(events.Tags())


def test_a_tensorboard_directory_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TensorBoardError, match=f"cannot write to --tensorboard {blocker}"):
        live_tensorboard.check(blocker)
    for command, code in (("ormo_ps.server.cli", 1), ("ormo_ps.launcher.cli", 2)):
        result = subprocess.run([sys.executable, "-m", command, "--out", str(tmp_path / "out"),
                                 "--tensorboard", str(blocker / "tb")], env=ENV, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == code, result.stderr
        assert f"cannot write to --tensorboard {blocker / 'tb'}: Not a directory" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_ps_sim_writes_its_records_live(tmp_path):
    sim_main(["--dataset", "digits", "--model", "mlp", "--workers", "2", "--iterations", "40", "--log-every", "10",
              "--eval-every", "0", "--out", str(tmp_path / "sim"), "--tensorboard", str(tmp_path / "tb"), "-q"])
    events = EventAccumulator(str(tmp_path / "tb" / "sim"))
    events.Reload()
    records = read_metrics(tmp_path / "sim" / "metrics.jsonl")
    steps = [r["iteration"] for r in records if r["event"] == "progress"]
    assert [e.step for e in events.Scalars("train/epoch")] == steps == [10, 20, 30, 40]
    assert [e.step for e in events.Scalars("eval/test_accuracy")] == [40]


@pytest.mark.slow
def test_prometheus_scrapes_every_process_of_a_launch_from_its_targets_file(tmp_path):
    """A real Prometheus (where it is installed) finds a ps-launch run's processes through
    OUT/prometheus_targets.json, as deploy/prometheus/local.yml points it there, and scrapes them all."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    out = tmp_path / "runs" / "launch"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "local.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["file_sd_configs"][0] |= {"files": [str(out / TARGETS_FILE)], "refresh_interval": "1s"}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with socket.socket() as probe:  # Prometheus cannot say which port 0 gave it: a free one, picked here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = launch("--workers", "2", "--epochs", "2000", "--out", str(out), "--metrics-port", "0", "-q",
                      "--timeout", "300")
    prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"

    def get(path: str) -> dict:
        try:
            with urllib.request.urlopen(api + path, timeout=5) as reply:
                return json.loads(reply.read())["data"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return {}

    def healthy() -> set[str]:
        return {t["labels"]["process"] for t in get("/targets").get("activeTargets", []) if t["health"] == "up"}

    try:
        wait_until(lambda: healthy() == {"server", "evaluator", "worker-0", "worker-1"}, 120, "Prometheus' targets")
        query = "/query?query=ormo_ps_server_gradients_applied_total"
        wait_until(lambda: [r for r in get(query).get("result", []) if float(r["value"][1]) > 0], 60,
                   "a scraped counter")
        (result,) = get(query)["result"]
        assert result["metric"]["role"] == "server" and result["metric"]["job"] == "ormo-ps"
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.communicate(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
