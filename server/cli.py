"""`ps-server`: serve a training run over gRPC until it finishes (or SIGTERM), with checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.cli_options import (
    run_cli,
    run_config_from,
    run_options,
    server_security_from,
    server_security_options,
    setup_logging,
)
from common.codec import GRPC_MESSAGE_OPTIONS
from common.config import RunConfig
from common.data import iterations_per_epoch, load_dataset
from common.grpc_options import GRPC_KEEPALIVE_OPTIONS
from common.malloc_tuning import tune_malloc
from common.metrics import MetricsWriter
from common.security import ServerSecurity, warn_if_exposed
from server.checkpoint import CheckpointError, load_checkpoint
from server.run import initial_model, make_core
from server.service import SERVICE_NAME, Counters, ParameterServerService, add_to_server

logger = logging.getLogger(__name__)


async def serve(
    run: RunConfig,
    *,
    bind: str = "127.0.0.1:0",
    out_dir: Path | None = None,
    resume: Path | None = None,
    checkpoint_every: float = 60.0,
    log_every: int = 50,
    linger: float = 10.0,
    wait_for_all_workers: bool = True,
    grace: float = 5.0,
    on_bound: object = None,
    security: ServerSecurity = ServerSecurity(),
    sync_timeout: float | None = None,
    on_started: Callable[[ParameterServerService, int], None] | None = None,
) -> ParameterServerService:
    """Run the service until the run is finished (plus `linger` seconds for evaluators) or a signal."""
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        saved = dict(state["run"])
        saved["lr_milestones"] = tuple(saved["lr_milestones"]) if saved["lr_milestones"] is not None else None
        run = RunConfig(**saved)
        logger.info("resuming %s at iteration %d from %s", run.algo, state["core"]["iteration"], resume)
    dataset = load_dataset(run.dataset, run.data_dir, run.download)
    ipe = iterations_per_epoch(dataset, run.batch_size)
    if ipe < 1:
        raise ValueError(f"batch_size {run.batch_size} is larger than the train set ({dataset.num_train})")
    model = initial_model(run, dataset, "cpu")
    core = make_core(run, model.params, ipe)
    counters = None
    if state is not None:
        core.load_state_dict(state["core"])
        counters = Counters(**state["counters"])
        if core.done:
            raise ValueError(f"the run in {resume} is already finished ({core.iteration} iterations); "
                             "nothing to resume")
    metrics = MetricsWriter(out_dir / "metrics.jsonl", mode="a") if out_dir else None
    service = ParameterServerService(core, run, num_classes=dataset.num_classes, out_dir=out_dir, metrics=metrics,
                                     log_every=log_every, checkpoint_every=checkpoint_every,
                                     wait_for_all_workers=wait_for_all_workers, counters=counters,
                                     sync_timeout=sync_timeout)
    if state is not None:
        service.ever_assigned = set(state["ever_assigned"])
    if metrics and state is None:
        metrics.write("start", source="server", config=run.to_dict(), num_parameters=core.w.numel(),
                      iterations_per_epoch=ipe, total_iterations=core.config.total_iterations)

    server = grpc.aio.server(options=GRPC_MESSAGE_OPTIONS + GRPC_KEEPALIVE_OPTIONS,
                             interceptors=security.interceptors())
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = security.credentials()
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    warn_if_exposed(bind, security)
    if port == 0:
        raise OSError(f"could not bind {bind}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = bind.rsplit(":", 1)[0]
    click.echo(f"ps-server listening on {host}:{port}", nl=True)
    if callable(on_bound):
        on_bound(port)
    if on_started is not None:
        on_started(service, port)  # tests and embedders reach the live service, on the serving loop

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("signal received: checkpointing and stopping (again to exit at once)")
            stop.set()
        else:
            raise SystemExit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    watchdog = asyncio.create_task(service.watch_barrier())
    try:
        finished = asyncio.create_task(service.finished.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if service.finished.is_set():
            logger.info("run finished at iteration %d", core.iteration)
            if metrics:
                metrics.write("summary", **service_summary(service))
            # Evaluators fetch the final parameters: serve until one has (or `linger` runs out, or a signal).
            waits = [asyncio.create_task(e.wait()) for e in (stop, service.final_fetched)]
            await asyncio.wait(waits, timeout=linger, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
        else:
            await service.shutdown()
        for t in (finished, stopped):
            t.cancel()
    finally:
        watchdog.cancel()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace)
        if service._checkpoint_task is not None:
            await asyncio.gather(service._checkpoint_task, return_exceptions=True)
        if metrics:
            metrics.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return service


def service_summary(service: ParameterServerService) -> dict:
    core = service.core
    st = core.staleness
    return dict(
        algo=service.run.algo, workers=service.run.workers, iterations=core.iteration, epochs=round(core.epoch, 4),
        time=round(service.uptime(), 4), gradients_applied=service.counters.gradients_applied,
        gradients_rejected=service.counters.gradients_rejected,
        rejected_by_reason=service.counters.rejected_by_reason, final_train_loss=service.last_epoch_train_loss,
        staleness_mean=round(st.mean, 4), staleness_max=st.maximum,
        staleness_histogram={str(k): v for k, v in sorted(st.histogram.items())},
        gradients_per_worker=[rec.gradients_applied for rec in core.workers],
    )


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@run_options
@click.option("--bind", default="127.0.0.1:50051", help="Address to listen on; port 0 picks a free port.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/server",
              help="Output directory: metrics.jsonl, checkpoint.pt, final.pt.")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue from this checkpoint (a file or a directory holding checkpoint.pt); its run config wins.")
@click.option("--checkpoint-every", type=click.FloatRange(min=0, min_open=True), default=60.0,
              help="Seconds between checkpoints (one is also written at the end and on SIGTERM).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, help="Progress record every N iterations.")
@click.option("--linger", type=click.FloatRange(min=0), default=10.0,
              help="Seconds to keep serving GetParameters/GetStatus after the run finishes; ends as soon as an "
                   "evaluator has fetched the final parameters.")
@click.option("--sync-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
              help="Synchronous runs: drop a worker silent this many seconds from the barrier.")
@click.option("--start-when-all/--start-at-once", "wait_for_all", default=True,
              help="Send w_0 once all K workers registered (as Algorithm 1), or to each worker as it comes.")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="torch CPU threads for the updates. One keeps a core free for gRPC and the event loop "
                   "(more threads only pay off for updates of tens of millions of parameters).")
@server_security_options
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging.")
def cli(**kwargs) -> None:
    """Serve a training run: workers connect with `ps-worker --server HOST:PORT`."""
    run = run_config_from(kwargs)
    security = server_security_from(kwargs)
    setup_logging(kwargs.pop("verbose"))
    tune_malloc()
    torch.set_num_threads(kwargs["threads"])
    out_dir = Path(kwargs["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(serve(run, bind=kwargs["bind"], out_dir=out_dir,
                          resume=Path(kwargs["resume"]) if kwargs["resume"] else None,
                          checkpoint_every=kwargs["checkpoint_every"], log_every=kwargs["log_every"],
                          linger=kwargs["linger"], wait_for_all_workers=kwargs["wait_for_all"],
                          security=security, sync_timeout=kwargs["sync_timeout"]))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot serve on {kwargs['bind']}: {e}") from None


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-server")


if __name__ == "__main__":
    main()
