"""`ps-worker`: the per-container worker entrypoint. It needs the server's address and its data."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import click

from ormo_ps.common.cli_options import client_metrics, client_process_options, run_cli, setup_client_process
from ormo_ps.common.data import resolve_dataset
from ormo_ps.common.models import resolve_model
from ormo_ps.worker.client import Worker, WorkerError, WorkerOptions
from ormo_ps.worker.prom_metrics import WorkerMeters

EXIT_DIVERGED = 3  # as ps-server's and ps-sim's

logger = logging.getLogger(__name__)


def _checked(resolve: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if not value:
            return None
        try:
            resolve(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value

    return check


# ps-worker's and ps-eval's: what to build instead of what the server names.
MODEL_OPTIONS = [
    click.option("--model", default=None, metavar="NAME|MODULE:CALLABLE", callback=_checked(resolve_model),
                 help="Build this model (a name or an import path) instead of the one the server names; needed when "
                      "the server names none (--model client). The server checks a worker's parameter layout "
                      "(tensor by tensor); ps-eval checks the number of values."),
    click.option("--dataset", default=None, metavar="NAME|MODULE:CALLABLE", callback=_checked(resolve_dataset),
                 help="Load this data set (a name or an import path) instead of the one the server names."),
]


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(MODEL_OPTIONS):
        f = option(f)
    return f


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--server", default="127.0.0.1:50051", help="The parameter server's HOST:PORT.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where this worker's data set is.")
@click.option("--download/--no-download", default=False, help="Download CIFAR into --data-dir if missing.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=1.0,
              help="Make this a slow worker: computing each gradient takes this many times as long (the "
                   "round trip to the server is not slowed, as with a slower device).")
@click.option("--name", default=None, help="Name shown in the server's logs (default: the host name).")
@model_options
@client_process_options
def cli(**kw) -> None:
    """Compute gradients for a parameter server until it says stop."""
    security = setup_client_process(kw)
    try:
        options = WorkerOptions(server=kw["server"], data_dir=kw["data_dir"], download=kw["download"],
                                slowdown=kw["slowdown"], name=kw["name"], server_timeout=kw["server_timeout"],
                                device=kw["device"], security=security, model=kw["model"], dataset=kw["dataset"])
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    registry, endpoint = client_metrics(kw, "ps-worker")
    try:
        result = asyncio.run(Worker(options, WorkerMeters(registry) if registry else None).run())
    except WorkerError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(EXIT_DIVERGED if e.diverged else 1) from None
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if endpoint is not None:
            endpoint.close()
    click.echo(json.dumps({"worker_id": result.worker_id, "gradients_sent": result.gradients_sent,
                           "stop_reason": result.stop_reason}))
    if result.stop_reason == "server gone":
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-worker")


if __name__ == "__main__":
    main()
