"""`ps-server`: serve a training run over gRPC until it finishes (or SIGTERM), with checkpoints.

Building the service (`build_service`: the run's configuration, data, `w_0`, a checkpoint to resume) is
separate from serving it (server/serving.py: the gRPC server, health, signals, the end of the run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from ormo_ps.common import live_tensorboard, settings
from ormo_ps.common.chunks import DEFAULT_CHUNK_BYTES, MIB
from ormo_ps.common.cli_options import run_cli, setup_logging
from ormo_ps.common.data import iterations_per_epoch, load_dataset
from ormo_ps.common.evaluation import Evaluator
from ormo_ps.common.layout import layout_of
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.metrics import MetricsWriter
from ormo_ps.common.observe import MetricsPortInUse
from ormo_ps.common.security import ClientSecurity, ServerSecurity
from ormo_ps.common.security_options import server_security_from, server_security_options
from ormo_ps.common.settings import setting
from ormo_ps.server.checkpoint import CheckpointError, load_checkpoint
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import ServerCore
from ormo_ps.server.front import ShardFront, ShardLost
from ormo_ps.server.local_shards import LocalShards, start_local_shards
from ormo_ps.server.service import ParameterServerService
from ormo_ps.server.serving import PortInUse, serve

logger = logging.getLogger(__name__)

EXIT_DIVERGED = 3  # as ps-sim's


def _addresses(text: str) -> tuple[str, ...]:
    """Comma-separated HOST:PORT addresses (of shards)."""
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in addresses if ":" not in a or not a.rsplit(":", 1)[1].isdigit()]
    if bad or not addresses:
        raise ValueError(f"expected HOST:PORT,HOST:PORT,..., got {text!r}")
    return addresses


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
    first_message_timeout: float = setting(
        30.0, "Seconds a new Train stream has to send its Register; then it is closed (DEADLINE_EXCEEDED).",
        min=0, min_open=True)
    max_pending: int = setting(
        16, "Train streams open at once that have not registered yet; more are refused at once "
        "(RESOURCE_EXHAUSTED). Until it registers, a stream holds at most one message of the receive limit "
        "(8 bytes per parameter + 1 MiB; the chunk size + 1 MiB for --model client) for at most "
        "--first-message-timeout seconds.", min=1)
    start_when_all: bool = setting(
        True, "Send w_0 once all K workers registered (as Algorithm 1), or to each worker as it comes.",
        off="--start-at-once")
    chunk_mib: float = setting(
        DEFAULT_CHUNK_BYTES / MIB, "Send tensors larger than this (MiB) on the Train stream in pieces of exactly this size (the last: the rest): "
        "parameters to clients that read chunks, and the clients' gradients likewise; 0 sends and reads every tensor "
        "whole (chunked ones are refused). "
        "Pieces of a few MB cross gRPC 3-4x faster than one 45-100 MB message (bench/results/transport_probe.md).",
        min=0)
    metrics_port: int | None = setting(
        None, "Serve Prometheus metrics at http://HOST:PORT/metrics (counts, rates and times; never parameters or "
              "the token); 0 picks a free port and prints it. Off when not given.", min=0, max=65535, metavar="PORT")
    metrics_host: str | None = setting(
        None, "Address the metrics endpoint binds to. Default: loopback, or --bind's host when that is not "
              "loopback (--bind 0.0.0.0:50051 serves metrics on 0.0.0.0 too).", metavar="HOST")
    tensorboard: str | None = setting(
        None, "Write the progress records as TensorBoard events while the run trains, into "
              "DIRECTORY/<--out's name> (ps-eval --tensorboard DIRECTORY: its eval records into .../eval): "
              "`tensorboard --logdir DIRECTORY` shows the run live. Needs the tensorboard package.",
        metavar="DIRECTORY")
    shards: int = setting(
        1, "Shard the parameters over S processes on this machine (ps-shard, on the ports after --bind's): each "
           "holds one slice of the parameters and of the rule's state and takes its slice of every gradient, "
           "while this process orders the pushes; the parameters equal one server's bit for bit. 1: one process.",
        min=1, max=64)
    shard_addresses: tuple[str, ...] | None = setting(
        None, "Coordinate shards started elsewhere (`ps-shard --bind HOST:PORT`, one per address, in order) "
              "instead of starting --shards processes here; workers are told these addresses.",
        parse=_addresses, metavar="HOST:PORT,...")
    threads: int = setting(1, "torch CPU threads for the updates. One keeps a core free for gRPC and the event "
                              "loop (more threads only pay off for updates of tens of millions of parameters).",
                           min=1)

    def __post_init__(self) -> None:
        settings.validate(self)
        if self.shard_addresses is not None and self.shards not in (1, len(self.shard_addresses)):
            raise ValueError(f"--shards {self.shards} but {len(self.shard_addresses)} --shard-addresses")

    @property
    def shard_count(self) -> int:
        return len(self.shard_addresses) if self.shard_addresses is not None else self.shards

    @property
    def chunk_bytes(self) -> int:
        return round(self.chunk_mib * MIB)


def build_service(run: RunConfig, options: ServeOptions = ServeOptions(out=None), *, shards: LocalShards | None = None,
                  shard_security: ClientSecurity = ClientSecurity()) -> ParameterServerService:
    """The service of `run` (or of the checkpointed run in `options.resume`, whose configuration wins). A sharded
    one (`options.shard_count` > 1) is to be connected to its shards (`connect_shards`) before it serves."""
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
    if options.shard_count > 1 or options.shard_addresses is not None:
        if run.model_from_client:
            raise ValueError("--model client cannot be sharded yet: a sharded server builds w_0 from the run's model")
        core = ShardFront(params0, run, ipe, addresses=list(shards.addresses if shards else options.shard_addresses),
                          security=shard_security, chunk_bytes=options.chunk_bytes)
    else:
        core = ServerCore(params0, run, ipe)
    if state is not None and state["core"]["iteration"] >= core.total_iterations:
        raise ValueError(f"the run in {options.resume} is already finished ({state['core']['iteration']} "
                         "iterations); nothing to resume")
    out = Path(options.out) if options.out is not None else None
    listeners = []
    if options.tensorboard is not None:
        if out is None:
            raise ValueError("--tensorboard writes what metrics.jsonl holds: it needs --out")
        listeners.append(live_tensorboard.LiveTensorBoard(live_tensorboard.run_dir(options.tensorboard, out)))

    def model_state(params: torch.Tensor) -> dict:
        """final.pt's model state dict at `params`, BatchNorm statistics recomputed (as the simulator's)."""
        return Evaluator(run.initial_model(dataset), dataset, seed=run.seed).load(params).state_dict()

    service = ParameterServerService(
        core, num_classes=dataset.num_classes, out_dir=out,
        metrics=MetricsWriter(out / "metrics.jsonl", mode="a", listeners=listeners) if out else None,
        log_every=options.log_every,
        checkpoint_every=options.checkpoint_every, wait_for_all_workers=options.start_when_all,
        sync_timeout=options.sync_timeout, ready_timeout=options.ready_timeout, layout=layout,
        first_message_timeout=options.first_message_timeout, max_pending=options.max_pending,
        model_state=None if run.model_from_client else model_state, chunk_bytes=options.chunk_bytes)
    if shards is not None:
        service.shard_addresses = shards.advertised
    service.resume_state = state
    if state is not None and not service.sharded:
        service.load_state_dict(state)
    # A resumed run writes a start record too: records past its iteration (lost with the crash) are superseded.
    resumed = {"resumed_from_iteration": core.iteration} if state is not None else {}
    service.recorder.start("server", run.to_dict(), num_parameters=core.numel, iterations_per_epoch=ipe,
                           **resumed)
    return service


async def connect_shards(service: ParameterServerService, options: ServeOptions) -> None:
    """Attach a sharded service's shards to the run; a resumed run's shards load their states of its checkpoint
    (its manifest), then every worker is gone, as a resumed server's."""
    front = service.core
    await front.connect()
    state = service.resume_state
    if state is not None:
        if "shards" not in state:
            raise CheckpointError(f"{options.resume} is the checkpoint of an unsharded server; resume it with "
                                  "--shards 1")
        resume = Path(options.resume)
        await front.load_shards(resume if resume.is_dir() else resume.parent, state["shards"],
                                state["core"]["iteration"])
        service.load_state_dict(state)


async def serve_run(run: RunConfig, options: ServeOptions = ServeOptions(out=None), *,
                    security: ServerSecurity = ServerSecurity(), grace: float = 5.0,
                    on_started: Callable[[ParameterServerService, int], None] | None = None) -> ParameterServerService:
    """Build the service of `run` and serve it (ps-server's whole job); with --shards, its shard processes too."""
    shards = None
    if options.shard_count > 1 and options.shard_addresses is None:
        if security.tls_cert:
            raise ValueError("a sharded server does not speak TLS yet: serve it without --tls-cert on a network "
                             "you trust, or with --shards 1")
        shards = await start_local_shards(options.shard_count, options.bind, token=security.resolved_token,
                                          threads=options.threads)
    try:
        service = build_service(run, options, shards=shards,
                                shard_security=ClientSecurity(token=security.resolved_token))
        if service.sharded:
            await connect_shards(service, options)
        try:
            await serve(service, bind=options.bind, security=security, linger=options.linger, grace=grace,
                        on_started=on_started, metrics_port=options.metrics_port, metrics_host=options.metrics_host)
        finally:
            if service.sharded:
                await service.core.close(finish=service.lifecycle.stop_message() if service.ended else None)
    finally:
        if shards is not None:
            shards.stop()
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
    if options.tensorboard is not None:
        try:
            live_tensorboard.check(options.tensorboard)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    try:
        service = asyncio.run(serve_run(run, options, security=security))
    except (CheckpointError, FileNotFoundError, ValueError, PortInUse, MetricsPortInUse, ShardLost) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None
    if service.checkpoints.failures:
        raise click.ClickException("; ".join(service.checkpoints.failures))
    if service.lifecycle.aborted is not None:
        raise click.ClickException(f"{service.lifecycle.aborted}; the run stopped. Its last checkpoint is one "
                                   f"consistent cut of every shard: resume with --resume {options.out}")
    if service.diverged is not None:
        click.echo(f"Error: {service.diverged}; the last finite parameters are in {options.out}", err=True)
        raise SystemExit(EXIT_DIVERGED)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-server")


if __name__ == "__main__":
    main()
