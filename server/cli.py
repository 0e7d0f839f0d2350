"""`ps-server`: serve a training run over gRPC until it finishes (or SIGTERM), with checkpoints.

Building the service (`build_service`: the run's configuration, data, `w_0`, a checkpoint to resume) is
separate from serving it (`serve`: the gRPC server, health, signals, the end of the run).
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
from dataclasses import dataclass
from pathlib import Path

import click
import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import settings
from common.cli_options import run_cli, server_security_from, server_security_options, setup_logging
from common.data import iterations_per_epoch, load_dataset
from common.evaluation import Evaluator
from common.grpc_options import server_options
from common.layout import layout_of
from common.malloc_tuning import tune_malloc
from common.metrics import MetricsWriter
from common.security import ServerSecurity, warn_if_exposed
from common.settings import setting
from server.checkpoint import CheckpointError, load_checkpoint
from server.config import RunConfig
from server.core import ServerCore
from server.service import SERVICE_NAME, ParameterServerService, add_to_server

logger = logging.getLogger(__name__)

# The line ps-server prints once it listens, and the one way to read it back (ps-launch, tests, benchmarks):
# `listening_port(line)`, or LISTENING_PATTERN (groups: host, port) where a tool waits for a regex in a log.
LISTENING = "ps-server listening on {host}:{port}"
LISTENING_PATTERN = r"ps-server listening on (\S+):(\d+)"


def listening_port(line: str) -> int | None:
    """The port of a `ps-server listening on HOST:PORT` line, None for any other line."""
    m = re.search(LISTENING_PATTERN, line)
    return int(m.group(2)) if m else None


EXIT_DIVERGED = 3  # as ps-sim's


@dataclass(frozen=True)
class ServeOptions:
    """How ps-server serves a run (the run itself is the RunConfig)."""

    bind: str = setting("127.0.0.1:50051", "Address to listen on; port 0 picks a free port.")
    out: str | None = setting("runs/server", "Output directory: metrics.jsonl, checkpoint.pt, final.pt.",
                              metavar="DIRECTORY")
    resume: str | None = setting(
        None, "Continue from this checkpoint (a file or a directory holding checkpoint.pt); its run config wins.",
        metavar="PATH")
    checkpoint_every: float = setting(
        60.0, "Seconds between checkpoints (one is also written at the end and on SIGTERM).", min=0, min_open=True)
    log_every: int = setting(50, "Progress record every N iterations.", min=1)
    linger: float = setting(
        10.0, "Seconds to keep serving GetParameters/GetStatus after the run finishes; ends as soon as an "
              "evaluator has fetched the final parameters.", min=0)
    sync_timeout: float | None = setting(
        300.0, "Synchronous runs: drop a worker silent this many seconds from the barrier.", min=0, min_open=True)
    ready_timeout: float = setting(
        120.0, "Seconds a registered worker has to load its data and say Ready; then its slot is given back.",
        min=0, min_open=True)
    start_when_all: bool = setting(
        True, "Send w_0 once all K workers registered (as Algorithm 1), or to each worker as it comes.",
        off="--start-at-once")
    threads: int = setting(1, "torch CPU threads for the updates. One keeps a core free for gRPC and the event "
                              "loop (more threads only pay off for updates of tens of millions of parameters).",
                           min=1)

    def __post_init__(self) -> None:
        settings.validate(self)


def build_service(run: RunConfig, options: ServeOptions = ServeOptions(out=None)) -> ParameterServerService:
    """The service of `run` (or of the checkpointed run in `options.resume`, whose configuration wins)."""
    state = load_checkpoint(options.resume) if options.resume is not None else None
    if state is not None:
        run = RunConfig.from_dict(state["run"])
        logger.info("resuming %s at iteration %d from %s", run.algo, state["core"]["iteration"], options.resume)
    dataset = load_dataset(run.dataset, run.data_dir, run.download)
    ipe = iterations_per_epoch(dataset, run.batch_size)
    if ipe < 1:
        raise ValueError(f"batch_size {run.batch_size} is larger than the train set ({dataset.num_train})")
    if run.model_from_client:  # w_0 and the layout come from the first client
        params0, layout = torch.empty(0), None
    else:
        model = run.initial_model(dataset)
        params0, layout = model.params, layout_of(model.module)
    core = ServerCore(params0, run, ipe)
    if state is not None and state["core"]["iteration"] >= core.total_iterations:
        raise ValueError(f"the run in {options.resume} is already finished ({state['core']['iteration']} "
                         "iterations); nothing to resume")
    out = Path(options.out) if options.out is not None else None

    def model_state(params: torch.Tensor) -> dict:
        """final.pt's model state dict at `params`, BatchNorm statistics recomputed (as the simulator's)."""
        return Evaluator(run.initial_model(dataset), dataset, seed=run.seed).load(params).state_dict()

    service = ParameterServerService(
        core, num_classes=dataset.num_classes, out_dir=out,
        metrics=MetricsWriter(out / "metrics.jsonl", mode="a") if out else None, log_every=options.log_every,
        checkpoint_every=options.checkpoint_every, wait_for_all_workers=options.start_when_all,
        sync_timeout=options.sync_timeout, ready_timeout=options.ready_timeout, layout=layout,
        model_state=None if run.model_from_client else model_state)
    if state is not None:
        service.load_state_dict(state)
    # A resumed run writes a start record too: records past its iteration (lost with the crash) are superseded.
    resumed = {"resumed_from_iteration": core.iteration} if state is not None else {}
    service.recorder.start("server", run.to_dict(), num_parameters=core.w.numel(), iterations_per_epoch=ipe,
                           **resumed)
    return service


@contextlib.asynccontextmanager
async def graceful_exit(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> AsyncIterator[asyncio.Event]:
    """An event the first SIGTERM/SIGINT sets (stop gracefully); a second signal exits at once (code 130).
    Outside the main thread (a server embedded in a test) no handler can be installed: the event stays clear."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        if received == 1:
            logger.info("signal received: checkpointing and stopping (again to exit at once)")
            stop.set()
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


async def serve(service: ParameterServerService, *, bind: str = "127.0.0.1:0",
                security: ServerSecurity = ServerSecurity(), linger: float = 10.0, grace: float = 5.0,
                on_started: Callable[[ParameterServerService, int], None] | None = None) -> None:
    """Serve `service` on `bind` until its run finishes (then up to `linger` seconds more for evaluators)
    or a signal arrives (then checkpoint and tell the workers)."""
    check_port_free(bind)
    server = grpc.aio.server(options=server_options(service.core.w.numel()), interceptors=security.interceptors())
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = security.credentials()
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        raise PortInUse(f"cannot listen on {bind} (in use, or not an address of this machine)")
    warn_if_exposed(bind, security)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    click.echo(LISTENING.format(host=bind.rsplit(":", 1)[0], port=port))
    if on_started is not None:
        on_started(service, port)  # tests and embedders reach the live service, on the serving loop
    async with graceful_exit() as stop:
        watchdog = asyncio.create_task(service.watch_barrier())
        try:
            await _first(service.finished, stop)
            if service.finished.is_set():
                await _first(stop, service.final_fetched, timeout=linger)
            else:
                await service.shutdown()
        finally:
            watchdog.cancel()
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await server.stop(grace)
            await service.aclose()


async def serve_run(run: RunConfig, options: ServeOptions = ServeOptions(out=None), *,
                    security: ServerSecurity = ServerSecurity(), grace: float = 5.0,
                    on_started: Callable[[ParameterServerService, int], None] | None = None) -> ParameterServerService:
    """Build the service of `run` and serve it (ps-server's whole job)."""
    service = build_service(run, options)
    await serve(service, bind=options.bind, security=security, linger=options.linger, grace=grace,
                on_started=on_started)
    return service


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@settings.click_options(RunConfig)
@settings.click_options(ServeOptions)
@server_security_options
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging.")
def cli(**kwargs) -> None:
    """Serve a training run: workers connect with `ps-worker --server HOST:PORT`."""
    run = settings.pop_settings(RunConfig, kwargs)
    options = settings.pop_settings(ServeOptions, kwargs)
    security = server_security_from(kwargs)
    setup_logging(kwargs.pop("verbose"))
    tune_malloc()
    torch.set_num_threads(options.threads)
    try:
        Path(options.out).mkdir(parents=True, exist_ok=True)
        probe = Path(options.out) / ".ps-server-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise click.ClickException(f"cannot write to --out {options.out}: {e.strerror}") from None
    try:
        service = asyncio.run(serve_run(run, options, security=security))
    except (CheckpointError, FileNotFoundError, ValueError, PortInUse) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None
    if service.checkpoints.failures:
        raise click.ClickException("; ".join(service.checkpoints.failures))
    if service.diverged is not None:
        click.echo(f"Error: {service.diverged}; the last finite parameters are in {options.out}", err=True)
        raise SystemExit(EXIT_DIVERGED)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-server")


if __name__ == "__main__":
    main()
