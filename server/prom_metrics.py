"""ps-server's Prometheus metrics, read from the service when Prometheus scrapes, never computed per gradient.

The service already keeps every number a dashboard wants (its counters, the core's iteration, staleness
histogram and per-worker records, the checkpointer's times, the bytes its (de)serializers counted): the
collector turns them into metric families at scrape time, in the endpoint's thread. It only reads: ints and
floats read whole, dicts copied in one step (a copy cannot be torn by the loop, an iteration could), so a
scrape cannot stall or disturb the event loop. Values of one scrape may straddle a gradient (the counters
of one, the histogram of the next); once the run is over they agree exactly (tests/test_observe.py).

Names follow Prometheus' conventions: `ormo_ps_server_` then what is counted, counters end in `_total`,
units in the name (`_seconds`, `_bytes`). Label sets are bounded: `reason` takes the service's rejection
reasons, `worker` the worker ids below min(K, PER_WORKER_SERIES).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from ormo_ps.server.service import ParameterServerService

PREFIX = "ormo_ps_server_"
# Per-worker series for worker ids below this (a run of 10,000 workers would otherwise be 20,000 series);
# the totals count every worker.
PER_WORKER_SERIES = 256
# Upper bounds of the staleness histogram's buckets (tau in iterations; exact delays are in metrics.jsonl's
# summary): 0, then powers of two, as staleness grows with K.
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
RATE_WINDOW = 10.0  # seconds of scrapes the updates-per-second gauge spans


class RateWindow:
    """The rate of a counter over the last `window` seconds, from samples taken when it is asked (at scrapes;
    at most one a second is kept): (count now - count at the newest sample at least `window` old) / their
    time apart. Until a sample is that old, the rate since the first one (the collector's start)."""

    def __init__(self, now: float, count: float, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque([(now, count)])

    def rate(self, now: float, count: float) -> float:
        if now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, count))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        then, before = self.samples[0]
        return (count - before) / (now - then) if now > then else 0.0


class ServerCollector(Collector):
    """The metric families of one run's service (see the module's docstring for what each is)."""

    def __init__(self, service: ParameterServerService) -> None:
        self.service = service
        self.updates = RateWindow(time.monotonic(), service.counters.gradients_applied)

    def collect(self) -> Iterator:
        s = self.service
        core, counters, run = s.core, s.counters, s.run
        applied = counters.gradients_applied

        info = InfoMetricFamily(PREFIX + "run", "The run: its update rule, model, data set and K.")
        info.add_metric([], {"algo": run.algo, "model": run.model_name, "dataset": run.dataset,
                             "scheduler": core.scheduler, "workers": str(core.num_workers),
                             "wire_dtype": run.wire_dtype})
        yield info

        yield _counter("gradients_applied", "Gradients applied to the parameters (metrics.jsonl's gradients_applied).",
                       applied)
        rejected = CounterMetricFamily(PREFIX + "gradients_rejected",
                                       "Messages refused, by reason (malformed, tensor, nonfinite, overflow, ...).",
                                       labels=["reason"])
        for reason, n in sorted(dict(counters.rejected_by_reason).items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield _counter("gradients_discarded", "Valid gradients the rule ignored (Ringmaster: too stale).",
                       counters.gradients_discarded)
        yield _counter("workers_dropped", "Workers dropped: non-finite gradients in a row, or silent at a barrier.",
                       counters.dropped_workers)
        yield _gauge("updates_per_second",
                     f"Gradients applied per second over the last {RATE_WINDOW:g} s of scrapes (Prometheus: "
                     f"rate({PREFIX}gradients_applied_total[1m])).",
                     self.updates.rate(time.monotonic(), applied))

        yield _gauge("iteration", "The server iteration t (gradients consumed).", core.iteration)
        yield _gauge("iterations_target", "The run's length in iterations.", core.total_iterations)
        yield _gauge("epoch", "The epoch the run is in (iterations / iterations per epoch).", core.epoch)
        yield _gauge("learning_rate", "The schedule's eta at the current iteration.", core.lr())
        yield _gauge("run_done", "1 once the run has ended (its last iteration, or divergence).", float(s.ended))
        yield _gauge("run_diverged", "1 once the run has diverged.", float(s.diverged is not None))

        staleness = core.staleness
        histogram = dict(staleness.histogram)
        buckets = []
        for bound in STALENESS_BUCKETS:
            below = sum(n for delay, n in histogram.items() if delay <= bound)
            buckets.append((floatToGoString(bound), below))
        count = sum(histogram.values())
        buckets.append(("+Inf", count))
        family = HistogramMetricFamily(PREFIX + "staleness_iterations",
                                       "Delay tau = t - ite of each applied gradient, in iterations.")
        family.add_metric([], buckets, sum_value=sum(delay * n for delay, n in histogram.items()))
        yield family

        per_worker = CounterMetricFamily(PREFIX + "worker_gradients_applied",
                                         f"Gradients applied, by worker id (ids below {PER_WORKER_SERIES}).",
                                         labels=["worker"])
        for k, record in enumerate(list(core.workers)[:PER_WORKER_SERIES]):
            per_worker.add_metric([str(k)], record.gradients_applied)
        yield per_worker
        seen = GaugeMetricFamily(PREFIX + "worker_last_seen_timestamp_seconds",
                                 "Unix time of each worker's last message (workers seen since the server started).",
                                 labels=["worker"])
        for k, at in sorted(dict(s.seen_at).items()):
            if k < PER_WORKER_SERIES:
                seen.add_metric([str(k)], at)
        yield seen

        yield _gauge("workers_expected", "K: the workers the run is for.", core.num_workers)
        connections = list(s.connections.values())
        yield _gauge("workers_connected", "Workers admitted (given a worker id) whose Train stream is open.",
                     len(connections))
        yield _gauge("workers_ready", "Connected workers that said Ready (they train).",
                     sum(c.ready for c in connections))
        yield _gauge("streams_pending", "Train streams open that have not registered yet.", s.admission.pending)

        yield _counter("received_bytes", "Bytes of the gRPC messages received (without gRPC's framing).",
                       s.traffic.received_bytes)
        yield _counter("sent_bytes", "Bytes of the gRPC messages sent (without gRPC's framing).",
                       s.traffic.sent_bytes)

        checkpoints = s.checkpoints
        yield _counter("checkpoints_written", "Checkpoints this process wrote.", checkpoints.written)
        yield _counter("checkpoint_failures", "Checkpoint writes that failed (the last good one is kept).",
                       checkpoints.write_failures)
        written_at = checkpoints.written_at
        if written_at is not None:
            yield _gauge("checkpoint_age_seconds", "Seconds since the last checkpoint was written.",
                         max(0.0, time.time() - written_at))
            yield _gauge("checkpoint_iteration", "The iteration of the last checkpoint written.",
                         checkpoints.iteration if checkpoints.iteration is not None else math.nan)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def register(service: ParameterServerService, registry: CollectorRegistry) -> ServerCollector:
    """Put `service`'s metrics on `registry` (a process's own: common/observe.py's `new_registry`)."""
    collector = ServerCollector(service)
    registry.register(collector)
    return collector
