"""A process's Prometheus metrics: its own registry, its CPU and memory, and the HTTP endpoint that serves them.

Every ps-* process that is asked to (`--metrics-port`) serves `GET /metrics` in the text format Prometheus
scrapes. The registry is the process's own, never prometheus_client's global one: tests run several servers
in one interpreter, and each must count only its own. The endpoint runs in a thread of its own
(prometheus_client's WSGI server), so a scrape never waits for the training loop and the loop never waits
for a scrape; what the loop's objects hold is read at scrape time by collectors (server/prom_metrics.py).

Where it binds: where the user says (`--metrics-host`); by default on loopback, unless the process itself
serves elsewhere (ps-server `--bind 0.0.0.0:50051`: its metrics on 0.0.0.0 too, so a Prometheus that
reaches the server reaches its metrics). What it serves are counts, times and sizes, never parameters, a
token or a path to one.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Callable

import click
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import start_http_server

__all__ = ["DEFAULT_HOST", "METRICS_LINE", "METRICS_PATTERN", "MetricsEndpoint", "MetricsPortInUse", "host_for_bind",
           "metrics_address", "new_registry", "serve_metrics"]

DEFAULT_HOST = "127.0.0.1"
NAMESPACE = "ormo_ps"  # every metric of ours starts with it (the process_* ones are prometheus_client's standard)

# The line a process prints once its endpoint listens, and the one way to read it back (ps-launch, tests):
# `metrics_address(line)`, or METRICS_PATTERN (groups: the program, host, port) where a tool waits for a regex.
METRICS_LINE = "{prog} metrics on http://{host}:{port}/metrics"
METRICS_PATTERN = r"(ps-[\w-]+) metrics on http://(\S+):(\d+)/metrics"


class MetricsPortInUse(OSError):
    """The port a process was asked to serve its metrics on is taken."""


def metrics_address(line: str) -> tuple[str, str, int] | None:
    """(program, host, port) of a `... metrics on http://HOST:PORT/metrics` line, None for any other line."""
    m = re.search(METRICS_PATTERN, line)
    return (m.group(1), m.group(2).strip("[]"), int(m.group(3))) if m else None


def host_for_bind(bind: str | None) -> str:
    """The default metrics host of a process that serves on `bind` (HOST:PORT; None: it serves nothing):
    loopback, unless that host is not loopback: then the same host (0.0.0.0, a pod's address)."""
    if not bind:
        return DEFAULT_HOST
    host = bind.rpartition(":")[0].strip("[]")
    if not host or host == "localhost":
        return DEFAULT_HOST
    try:
        return DEFAULT_HOST if ipaddress.ip_address(host).is_loopback else host
    except ValueError:  # a host name: serve where it resolves, as the gRPC server does
        return host


def new_registry() -> CollectorRegistry:
    """A registry of this process's own, with its CPU time, memory and open files (`process_*`)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """`GET /metrics` of `registry` on host:port (port 0: a free one, `port` says which), in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.host = host
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except socket.gaierror as e:
            raise OSError(f"cannot serve metrics on {host!r}: {e.strerror}") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(f"metrics port {port} on {host} is in use; pick another with --metrics-port, "
                                       "or 0 for any free one") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise OSError(f"cannot serve metrics on {host}: not an address of this machine "
                              "(--metrics-host)") from None
            raise
        self.port: int = self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (idempotent); a scrape in progress finishes."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int, prog: str,
                  say: Callable[[str], None] = click.echo) -> MetricsEndpoint:
    """Start `prog`'s endpoint and say where it listens, in the line METRICS_PATTERN reads back."""
    endpoint = MetricsEndpoint(registry, host, port)
    shown = f"[{host}]" if ":" in host else host
    say(METRICS_LINE.format(prog=prog, host=shown, port=endpoint.port))
    return endpoint
