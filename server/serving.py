"""Serving a built service (server/cli.py's `build_service`): the gRPC server with health checks, the
line that says where it listens, signals (a first SIGTERM/SIGINT checkpoints and stops, a second a second later exits),
a port already in use named in one line, and the end of the run (evaluators get `linger` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ormo_ps.common.grpc_options import client_model_receive_limit, server_options
from ormo_ps.common.observe import host_for_bind, new_registry, serve_metrics
from ormo_ps.common.security import ServerSecurity, warn_if_exposed
from ormo_ps.server import prom_metrics
from ormo_ps.server.service import ParameterServerService
from ormo_ps.server.servicer import SERVICE_NAME, add_to_server

logger = logging.getLogger(__name__)

# The line ps-server prints once it listens, and the one way to read it back (ps-launch, tests, benchmarks):
# `listening_port(line)`, or LISTENING_PATTERN (groups: host, port) where a tool waits for a regex in a log.
LISTENING = "ps-server listening on {host}:{port}"
LISTENING_PATTERN = r"ps-server listening on (\S+):(\d+)"


def listening_port(line: str) -> int | None:
    """The port of a `ps-server listening on HOST:PORT` line, None for any other line."""
    m = re.search(LISTENING_PATTERN, line)
    return int(m.group(2)) if m else None


# A second signal this soon after the first is the same request, not an "exit now": a ps-launch killed with
# SIGKILL delivers its children's death signal (PR_SET_PDEATHSIG) once for each of its threads as they die
# (the kernel hands the children from a dying thread to the next one, signalling each time), within
# milliseconds. A person's second Ctrl-C, or an operator's second `kill`, comes later than this.
SAME_REQUEST_SECONDS = 1.0


@contextlib.asynccontextmanager
async def graceful_exit(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), *,
                        same_request: float = SAME_REQUEST_SECONDS,
                        doing: str = "checkpointing and stopping") -> AsyncIterator[asyncio.Event]:
    """An event the first SIGTERM/SIGINT sets (stop gracefully: `doing`, in the log); a second signal,
    `same_request` seconds or more after the first, exits at once (code 130); one sooner is the first one again
    and only logged.
    Outside the main thread (a server embedded in a test) no handler can be installed: the event stays clear."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    first: float | None = None

    def on_signal() -> None:
        nonlocal first
        now = loop.time()
        if first is None:
            first = now
            logger.info("signal received: %s (again to exit at once)", doing)
            stop.set()
        elif now - first < same_request:
            logger.info("signal received again %.3f s after the first: still %s", now - first, doing)
        else:
            raise SystemExit(130)

    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of `events` is set (or `timeout` seconds pass)."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()


class PortInUse(OSError):
    """The address ps-server was asked to listen on is taken."""


def _split(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--bind must be HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)


def check_port_free(bind: str) -> None:
    """PortInUse when another process listens on `bind` (a ps-server, or any socket). gRPC's own bind sets
    SO_REUSEPORT, with which a second server would start silently and take part of the connections; the
    server is also told not to (grpc.so_reuseport = 0), this check only words the error first."""
    host, port = _split(bind)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host!r}: {e.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no owners
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {port} on {host} is in use (another ps-server?); pick another "
                                    "with --bind, or port 0 for any free one") from None
                raise


def add_port(server: grpc.aio.Server, bind: str, security: ServerSecurity) -> int:
    """Listen on `bind` (TLS when `security` has a certificate; a warning when it is exposed without): the port,
    or PortInUse."""
    credentials = security.credentials()
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        raise PortInUse(f"cannot listen on {bind} (in use, or not an address of this machine)")
    warn_if_exposed(bind, security)
    return port


async def serve(service: ParameterServerService, *, bind: str = "127.0.0.1:0",
                security: ServerSecurity = ServerSecurity(), linger: float = 10.0, grace: float = 5.0,
                on_started: Callable[[ParameterServerService, int], None] | None = None,
                metrics_port: int | None = None, metrics_host: str | None = None) -> None:
    """Serve `service` on `bind` until its run finishes (then up to `linger` seconds more for evaluators)
    or a signal arrives (then checkpoint and tell the workers); with `metrics_port`, its Prometheus metrics
    too (server/prom_metrics.py), on `metrics_host` (default: see common/observe.py's `host_for_bind`),
    from before the gRPC server listens until after it stopped."""
    check_port_free(bind)
    endpoint = None
    if metrics_port is not None:
        registry = new_registry()
        prom_metrics.register(service, registry)
        endpoint = serve_metrics(registry, metrics_host or host_for_bind(bind), metrics_port, "ps-server")
    try:
        await _serve(service, bind, security, linger, grace, on_started)
    finally:
        if endpoint is not None:
            endpoint.close()


async def _serve(service: ParameterServerService, bind: str, security: ServerSecurity, linger: float, grace: float,
                 on_started: Callable[[ParameterServerService, int], None] | None) -> None:
    numel = service.core.numel  # 0: a run whose first client brings the model
    limit = client_model_receive_limit(service.chunk_bytes) if numel == 0 else None
    server = grpc.aio.server(options=server_options(numel, limit), interceptors=security.interceptors())
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = add_port(server, bind, security)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    click.echo(LISTENING.format(host=bind.rsplit(":", 1)[0], port=port))
    if on_started is not None:
        on_started(service, port)  # tests and embedders reach the live service, on the serving loop
    async with graceful_exit() as stop:
        watchdog = asyncio.create_task(service.watch_barrier())
        try:
            await _first(service.finished, stop, service.lifecycle.abort_event)
            if service.finished.is_set():
                await _first(stop, service.final_fetched, timeout=linger)
            elif service.lifecycle.aborted is not None:  # (a sharded server lost a shard: no checkpoint)
                await asyncio.sleep(0.5)  # the workers read their Stop
            else:
                await service.shutdown()
        finally:
            watchdog.cancel()
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await server.stop(grace)
            await service.aclose()
