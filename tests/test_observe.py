"""Prometheus metrics of every process: what the server's collector reads agrees with the service's own books,
the endpoint serves them over HTTP where it is told to (loopback unless the server binds elsewhere), a port in
use is one clear line, the updates-per-second window, and the evaluator's gauges hold its last eval record."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ormo_ps.common.observe import (DEFAULT_HOST, MetricsEndpoint, MetricsPortInUse, host_for_bind, metrics_address,
                                    new_registry, serve_metrics)
from ormo_ps.server import prom_metrics
from ormo_ps.server.prom_metrics import RateWindow
from ormo_ps.worker.evaluator import run_evaluator
from ormo_ps.worker.prom_metrics import EvalMeters
from ormo_ps.server.config import RunConfig
from tests.conftest import LiveServer, raw_worker_factory
from tests.test_service import MakeWorker, gradient_message, good_gradient, start_run, status

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONPATH": str(ROOT)}
HTTP_TIMEOUT = 10.0


def scrape(url: str) -> dict[str, float]:
    """One GET of a metrics page: {sample name with its labels: value}, e.g. 'ormo_ps_server_iteration' or
    'ormo_ps_server_gradients_rejected_total{reason="nonfinite"}'."""
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as reply:
        return parse(reply.read().decode())


def parse(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def collected(registry: CollectorRegistry) -> dict[str, float]:
    from prometheus_client import generate_latest

    return parse(generate_latest(registry).decode())


# ----- the server's collector ----------------------------------------------------------------------
def test_the_server_metrics_are_the_services_books(server: LiveServer, raw_workers: MakeWorker):
    registry = CollectorRegistry()
    prom_metrics.register(server.service, registry)
    before = server.on_loop(lambda: collected(registry))
    assert before["ormo_ps_server_gradients_applied_total"] == 0
    assert before["ormo_ps_server_workers_expected"] == 2 and before["ormo_ps_server_iteration"] == 0
    assert 'ormo_ps_server_worker_last_seen_timestamp_seconds{worker="0"}' not in before

    a, b = start_run(raw_workers)
    for i in range(3):  # worker 1 three times (delays 0), then worker 0 at index 0 (delay 3)
        b.send(gradient_message(i, good_gradient(i)))
        assert b.parameters().iteration_index == i + 1
    a.send(gradient_message(0, good_gradient(9)))
    assert a.parameters().iteration_index == 4
    b.send(gradient_message(3, good_gradient(3) * float("nan")))  # refused: nonfinite
    b.expect_abort()

    after = server.on_loop(lambda: collected(registry))
    service = server.service
    assert after["ormo_ps_server_gradients_applied_total"] == service.counters.gradients_applied == 4
    assert after['ormo_ps_server_gradients_rejected_total{reason="nonfinite"}'] == 1
    assert after["ormo_ps_server_iteration"] == status(server).iteration == 4
    assert after["ormo_ps_server_epoch"] == pytest.approx(service.core.epoch)
    assert after["ormo_ps_server_learning_rate"] == pytest.approx(service.core.lr())
    assert after['ormo_ps_server_worker_gradients_applied_total{worker="0"}'] == 1
    assert after['ormo_ps_server_worker_gradients_applied_total{worker="1"}'] == 3
    # the staleness histogram: three delays of 0 and one of 3
    assert after['ormo_ps_server_staleness_iterations_bucket{le="0.0"}'] == 3
    assert after['ormo_ps_server_staleness_iterations_bucket{le="2.0"}'] == 3
    assert after['ormo_ps_server_staleness_iterations_bucket{le="4.0"}'] == 4
    assert after["ormo_ps_server_staleness_iterations_count"] == 4
    assert after["ormo_ps_server_staleness_iterations_sum"] == 3
    # bytes: at least the four gradients in, and w_0 and four answers out (9610 float32 values each)
    assert after["ormo_ps_server_received_bytes_total"] > 4 * 4 * 9610
    assert after["ormo_ps_server_sent_bytes_total"] > 6 * 4 * 9610
    assert after['ormo_ps_server_worker_last_seen_timestamp_seconds{worker="1"}'] >= \
        after['ormo_ps_server_worker_last_seen_timestamp_seconds{worker="0"}'] > 0
    assert after["ormo_ps_server_workers_connected"] == 1 and after["ormo_ps_server_workers_ready"] == 1
    assert after['ormo_ps_server_run_info{algo="ormo",dataset="digits",model="mlp",scheduler="async",' \
                 'wire_dtype="float32",workers="2"}'] == 1
    assert after["ormo_ps_server_run_done"] == 0 and after["ormo_ps_server_checkpoints_written_total"] == 0
    assert "ormo_ps_server_checkpoint_age_seconds" not in after  # none written yet


def test_updates_per_second_spans_the_last_window_of_scrapes():
    window = RateWindow(now=100.0, count=0, window=10.0)
    assert window.rate(105.0, 50) == 10.0  # since the start: nothing older yet
    assert window.rate(110.0, 150) == 15.0  # 150 in the 10 s since the start
    assert window.rate(115.0, 350) == 30.0  # from the sample at 105, the newest one 10 s old: 300 in 10 s
    assert window.rate(115.5, 360) == pytest.approx(310 / 10.5)  # within a second of the last: not kept
    assert len(window.samples) <= 3


# ----- the endpoint ------------------------------------------------------------------------------
def test_the_default_metrics_host_is_loopback_unless_the_server_binds_elsewhere():
    assert host_for_bind("127.0.0.1:50051") == DEFAULT_HOST
    assert host_for_bind("localhost:0") == DEFAULT_HOST
    assert host_for_bind("[::1]:50051") == DEFAULT_HOST
    assert host_for_bind(None) == DEFAULT_HOST
    assert host_for_bind("0.0.0.0:50051") == "0.0.0.0"
    assert host_for_bind("[::]:50051") == "::"
    assert host_for_bind("10.1.2.3:50051") == "10.1.2.3"


def test_the_endpoint_serves_the_process_and_says_where():
    lines = []
    registry = new_registry()
    with serve_metrics(registry, "127.0.0.1", 0, "ps-test", say=lines.append) as endpoint:
        assert metrics_address(lines[0]) == ("ps-test", "127.0.0.1", endpoint.port)
        page = scrape(endpoint.url)
        assert page["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in page
        with pytest.raises(MetricsPortInUse, match=f"metrics port {endpoint.port} on 127.0.0.1 is in use"):
            MetricsEndpoint(registry, "127.0.0.1", endpoint.port)


def test_a_metrics_port_in_use_is_one_line_from_ps_server(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ormo_ps.server.cli", "--dataset", "digits", "--model", "mlp",
                                 "--bind", "127.0.0.1:0", "--out", str(tmp_path), "--metrics-port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env=ENV)
    assert result.returncode == 1
    assert f"Error: metrics port {port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_a_worker_metrics_port_in_use_is_its_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ormo_ps.worker.cli", "--server", "127.0.0.1:1",
                                 "--metrics-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env=ENV)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: metrics port {port} on 127.0.0.1 is in use; pick another with " \
                                    "--metrics-port, or 0 for any free one"


# ----- the evaluator -----------------------------------------------------------------------------
def test_the_evaluator_gauges_hold_its_last_eval_record(start_live_server, tmp_path):
    live, stop = start_live_server(RunConfig(workers=1, dataset="digits", model="mlp", iterations=5), bind="127.0.0.1:0",
                                   linger=30.0)
    try:
        registry = CollectorRegistry()
        meters = EvalMeters(registry)
        with raw_worker_factory(live) as make:
            w = make()
            w.register()
            w.ready()
            index = w.parameters().iteration_index
            for _ in range(5):
                w.send(gradient_message(index, good_gradient(index)))
                msg = w.recv()
                if msg.WhichOneof("payload") != "parameters":
                    break
                index = msg.parameters.iteration_index
        record = run_evaluator(live.target, out_dir=tmp_path, eval_every=0, poll=0.05, meters=meters)
    finally:
        stop()
    page = collected(registry)
    assert record["iteration"] == 5
    assert page["ormo_ps_eval_iteration"] == 5 and page["ormo_ps_eval_evaluations_total"] == 1
    assert page["ormo_ps_eval_test_accuracy"] == record["test_accuracy"]
    assert page["ormo_ps_eval_test_loss"] == record["test_loss"]
    assert page["ormo_ps_eval_last_timestamp_seconds"] == record["timestamp"]
