"""Click options shared by `ps-sim` and `ps-server`: the flags that mean the same thing in both.

Every flag also reads an environment variable `PS_<FLAG>` (e.g. `PS_ALGO`, `PS_WORKERS`): the entry
points call click with `auto_envvar_prefix="PS"`, so containers configure by environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import click

from common.config import RunConfig
from common.data import DATASETS
from common.malloc_tuning import tune_malloc
from common.security import ClientSecurity, ServerSecurity
from common.models import MODELS
from server.algorithms import ALGORITHMS, SCHEDULERS


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like '80,120', got {value!r}") from None


RUN_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--algo", type=click.Choice(sorted(ALGORITHMS)), default="ormo", show_default=True,
                 help="Server update rule."),
    click.option("--workers", "-k", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Number of workers K."),
    click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
                 help="Override the algorithm's scheduler (async: answer each gradient; sync: wait for all K)."),
    click.option("--model", type=click.Choice(sorted(MODELS)), default=None,
                 help="Model (default: resnet20 for CIFAR, mlp for digits and synthetic)."),
    click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="digits", show_default=True,
                 help="Data set; digits and synthetic need no download."),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                 help="CIFAR directory: the original python batches or train/<class>/*, test/<class>/* images."),
    click.option("--download/--no-download", default=False, show_default=True,
                 help="Download CIFAR into --data-dir if it is not there (needs the network)."),
    click.option("--batch-size", "-b", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Per-worker mini-batch size B; an epoch is N_train / B server iterations."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
                 help="Learning rate eta."),
    click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="Linear learning-rate warm-up, in epochs."),
    click.option("--lr-milestones", callback=_floats, default=None,
                 help="Epochs at which eta is multiplied by --lr-gamma (default: 50% and 75% of the run)."),
    click.option("--lr-gamma", type=click.FloatRange(min=0, max=1, min_open=True), default=0.1, show_default=True,
                 help="Step-decay factor."),
    click.option("--momentum", type=click.FloatRange(min=0, max=1, max_open=True), default=0.9, show_default=True,
                 help="Momentum beta."),
    click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True,
                 help="Weight decay, added by the worker to its gradient."),
    click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                 help="Length of the run in epochs."),
    click.option("--iterations", type=click.IntRange(min=1), default=None,
                 help="Length of the run in server iterations (overrides --epochs)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of w_0, data order and timing."),
    click.option("--vanilla-sgd-step", is_flag=True, default=False,
                 help="OrMo's ablation: w -= eta*g in place of line 13."),
    click.option("--allow-nonfinite", is_flag=True, default=False,
                 help="Apply NaN/Inf gradients instead of rejecting them."),
]


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return _apply(RUN_OPTIONS, f)


def run_config_from(kwargs: dict[str, Any]) -> RunConfig:
    """Pops the shared options from click's kwargs and builds the (validated) RunConfig."""
    try:
        return RunConfig(
            algo=kwargs.pop("algo"), workers=kwargs.pop("workers"), scheduler=kwargs.pop("scheduler"),
            model=kwargs.pop("model"), dataset=kwargs.pop("dataset"), data_dir=kwargs.pop("data_dir"),
            download=kwargs.pop("download"), batch_size=kwargs.pop("batch_size"), lr=kwargs.pop("lr"),
            warmup_epochs=kwargs.pop("warmup_epochs"), lr_milestones=kwargs.pop("lr_milestones"),
            lr_gamma=kwargs.pop("lr_gamma"), momentum=kwargs.pop("momentum"),
            weight_decay=kwargs.pop("weight_decay"), epochs=kwargs.pop("epochs"),
            iterations=kwargs.pop("iterations"), seed=kwargs.pop("seed"),
            vanilla_sgd_step=kwargs.pop("vanilla_sgd_step"), reject_nonfinite=not kwargs.pop("allow_nonfinite"),
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_cli(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> None:
    """Run a click command with `PS_*` environment variables; return on success, SystemExit(code != 0) on failure."""
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name=prog_name, auto_envvar_prefix="PS")
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def run_config_flags(run: RunConfig) -> list[str]:
    """The command-line flags that reproduce `run` (the inverse of `run_config_from`)."""
    flags = ["--algo", run.algo, "--workers", str(run.workers), "--dataset", run.dataset,
             "--batch-size", str(run.batch_size), "--lr", repr(run.lr), "--warmup-epochs", repr(run.warmup_epochs),
             "--lr-gamma", repr(run.lr_gamma), "--momentum", repr(run.momentum),
             "--weight-decay", repr(run.weight_decay), "--epochs", repr(run.epochs), "--seed", str(run.seed)]
    if run.scheduler:
        flags += ["--scheduler", run.scheduler]
    if run.model:
        flags += ["--model", run.model]
    if run.data_dir:
        flags += ["--data-dir", run.data_dir]
    if run.download:
        flags += ["--download"]
    if run.lr_milestones is not None:
        flags += ["--lr-milestones", ",".join(repr(m) for m in run.lr_milestones)]
    if run.iterations is not None:
        flags += ["--iterations", str(run.iterations)]
    if run.vanilla_sgd_step:
        flags += ["--vanilla-sgd-step"]
    if not run.reject_nonfinite:
        flags += ["--allow-nonfinite"]
    return flags


_TOKEN_HELP = "Shared token: sent as 'authorization: Bearer TOKEN' on every call (checked on all but health)."
SERVER_SECURITY_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="Server certificate (PEM): TLS on."),
    click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Server private key (PEM)."),
    click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
                 help="Require client certificates signed by this CA (mutual TLS)."),
    click.option("--token", default=None, help=_TOKEN_HELP),
    click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="Read the token from a file."),
]
CLIENT_SECURITY_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                 help="CA certificate (PEM) that signed the server's: TLS on."),
    click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                 help="Client certificate (PEM), for mutual TLS."),
    click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Client private key (PEM)."),
    click.option("--tls-server-name", default=None, help="Expected name in the server's certificate (override)."),
    click.option("--token", default=None, help=_TOKEN_HELP),
    click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="Read the token from a file."),
]


def _apply(options: list[Callable[[Any], Any]], f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        f = option(f)
    return f


def server_security_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return _apply(SERVER_SECURITY_OPTIONS, f)


def client_security_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return _apply(CLIENT_SECURITY_OPTIONS, f)


def server_security_from(kwargs: dict[str, Any]) -> ServerSecurity:
    try:
        return ServerSecurity(tls_cert=kwargs.pop("tls_cert"), tls_key=kwargs.pop("tls_key"),
                              tls_client_ca=kwargs.pop("tls_client_ca"), token=kwargs.pop("token"),
                              token_file=kwargs.pop("token_file"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def client_security_from(kwargs: dict[str, Any]) -> ClientSecurity:
    try:
        return ClientSecurity(tls_ca=kwargs.pop("tls_ca"), tls_cert=kwargs.pop("tls_cert"),
                              tls_key=kwargs.pop("tls_key"), tls_server_name=kwargs.pop("tls_server_name"),
                              token=kwargs.pop("token"), token_file=kwargs.pop("token_file"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None


CLIENT_PROCESS_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--server-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
                 help="Exit when the server has been unreachable this many seconds."),
    click.option("--device", default="cpu", help="cpu, cuda or cuda:N."),
    click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's)."),
    *CLIENT_SECURITY_OPTIONS,
    click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging."),
]


def client_process_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What every client process of a server takes: timeout, device, threads, TLS/token, logging."""
    return _apply(CLIENT_PROCESS_OPTIONS, f)


def setup_client_process(kwargs: dict[str, Any]) -> ClientSecurity:
    """Logging and torch threads from `client_process_options`; returns the (validated) client security."""
    setup_logging(kwargs.pop("verbose"))
    tune_malloc()
    threads = kwargs.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return client_security_from(kwargs)
