"""ps-worker's and ps-eval's Prometheus metrics (on the process's own registry: common/observe.py).

A worker observes each gradient once (a counter and two histogram observations: microseconds, against the
milliseconds to seconds a gradient takes); the evaluator sets its gauges from each eval record it writes, so
they hold the values metrics.jsonl holds. Names follow Prometheus' conventions (`ormo_ps_worker_`,
`ormo_ps_eval_`, counters in `_total`, times in `_seconds`).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a small model's gradient on a CPU (a millisecond) to a large one's (tens of seconds).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMeters:
    """What a worker measures: gradients computed, how long each took to compute and to come back answered,
    reconnects, and the worker id the server gave it (to match the server's `worker` label)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gradients = Counter("ormo_ps_worker_gradients_computed", "Gradients computed and sent to the server.",
                                 registry=registry)
        self.compute = Histogram("ormo_ps_worker_compute_seconds",
                                 "Seconds to compute one gradient (a slow worker's --slowdown included).",
                                 buckets=SECONDS_BUCKETS, registry=registry)
        self.round_trip = Histogram("ormo_ps_worker_round_trip_seconds",
                                    "Seconds from a gradient sent to the next parameters received (the server's "
                                    "update, the network, and for synchronous rules the wait for the others).",
                                    buckets=SECONDS_BUCKETS, registry=registry)
        self.reconnects = Counter("ormo_ps_worker_reconnects", "Train streams opened again after one ended.",
                                  registry=registry)
        self.worker_id = Gauge("ormo_ps_worker_id", "The worker id the server gave this worker (-1: none yet).",
                               registry=registry)
        self.worker_id.set(-1)

    def computed(self, seconds: float) -> None:
        self.gradients.inc()
        self.compute.observe(seconds)


class EvalMeters:
    """What the evaluator measured last (the values of its last eval record) and how often it evaluated."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.evaluations = Counter("ormo_ps_eval_evaluations", "Evaluations done.", registry=registry)
        self.gauges = {field: Gauge(f"ormo_ps_eval_{field}", text, registry=registry) for field, text in (
            ("test_accuracy", "Test accuracy of the last evaluation (0-1)."),
            ("test_loss", "Test loss of the last evaluation."),
            ("iteration", "The server iteration whose parameters were evaluated last."),
            ("epoch", "The epoch of the parameters evaluated last."))}
        self.duration = Gauge("ormo_ps_eval_duration_seconds", "Seconds the last evaluation took.", registry=registry)
        self.last = Gauge("ormo_ps_eval_last_timestamp_seconds", "Unix time of the last evaluation.",
                          registry=registry)

    def evaluated(self, record: dict[str, Any], seconds: float) -> None:
        """An eval record written (common/metrics.py's `write_eval`) after `seconds` of evaluating."""
        self.evaluations.inc()
        for field, gauge in self.gauges.items():
            if record.get(field) is not None:
                gauge.set(record[field])
        self.duration.set(seconds)
        self.last.set(record.get("timestamp", time.time()))
