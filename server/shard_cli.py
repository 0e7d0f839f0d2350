"""`ps-shard`: serve one shard of a sharded server (server/shard.py) until SIGTERM; its coordinator
(`ps-server --shard-address HOST:PORT ...`) attaches to it and tells it the run and its slice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click

from ormo_ps.common.cli_options import run_cli, setup_logging
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.security_options import server_security_from, server_security_options
from ormo_ps.server.serving import PortInUse


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--bind", default="127.0.0.1:50061", show_default=True,
              help="Address to listen on (workers and the coordinator connect here); port 0 picks a free port.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch CPU threads for the updates of this shard's slice.")
@click.option("--exit-after-run", is_flag=True, default=False,
              help="Exit (0) once a coordinator whose run is over (finished or diverged) detaches, instead of "
                   "waiting for the next one: for `docker compose up`, which returns when every container has exited. "
                   "Not for a Kubernetes StatefulSet (it would restart the pod).")
@server_security_options
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging.")
def cli(bind: str, threads: int, exit_after_run: bool, verbose: bool, **kwargs) -> None:
    """Serve one shard of a sharded parameter server: `ps-server --shard-address` names it."""
    import torch

    from ormo_ps.server.shard import serve_shard

    security = server_security_from(kwargs)
    setup_logging(verbose, f"shard {bind}")
    tune_malloc()
    torch.set_num_threads(threads)
    try:
        asyncio.run(serve_shard(bind, security, exit_after_run=exit_after_run))
    except PortInUse as e:
        raise click.ClickException(str(e)) from None


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-shard")


if __name__ == "__main__":
    main()
