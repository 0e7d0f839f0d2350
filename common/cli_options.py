"""Click options and set-up shared by the command-line programs: logging, `PS_*` variables, `--device`,
the client-process options of ps-worker and ps-eval (TLS and token options: common/security_options.py).

Every flag also reads an environment variable `PS_<NAME>` (e.g. `PS_SERVER`, `PS_TOKEN`): the entry
points call click with `auto_envvar_prefix="PS"`, so containers configure by environment. The run's own
options come from its configuration's fields (`ormo_ps.server.config.RunConfig`, `ormo_ps.common.settings`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import click

from ormo_ps.common.parent import die_with_parent
from ormo_ps.common.env_variables import PS_VARIABLES
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.observe import DEFAULT_HOST, MetricsEndpoint, new_registry, serve_metrics
from ormo_ps.common.security import ClientSecurity
from ormo_ps.common.security_options import CLIENT_SECURITY_OPTIONS, apply_options, client_security_from
from ormo_ps.common.settings import ENV_PREFIX, env_name


def setup_logging(verbose: bool, context: str | None = None) -> None:
    """Log lines to stderr; `context` (e.g. "server HOST:PORT") is named on every line."""
    where = f" [{context}]" if context else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")


# PS_* variables read elsewhere than by an option, and former names.
OTHER_VARIABLES = {"PS_MALLOC_TUNING"}
RENAMED_VARIABLES = {"PS_OUT_DIR": "PS_OUT", "PS_WAIT_FOR_ALL": "PS_START_WHEN_ALL"}


def env_names(command: click.Command) -> set[str]:
    """The `PS_*` variables the options of `command` read."""
    names: set[str] = set()
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value:
            continue
        if param.envvar:
            names |= {param.envvar} if isinstance(param.envvar, str) else set(param.envvar)
        elif param.allow_from_autoenv and param.name:
            names.add(env_name(param.name))
    return names


def warn_about_unknown_variables(command: click.Command, prog_name: str) -> None:
    """A warning for each `PS_*` variable that no ps-* command reads (a misspelt `PS_OUTDIR` would otherwise be
    ignored in silence), with the names it may have meant; those of other ps-* commands pass quietly."""
    stray = sorted(n for n in os.environ if n.startswith(f"{ENV_PREFIX}_") and n not in env_names(command)
                   and n not in OTHER_VARIABLES)
    if not stray:
        return
    known = PS_VARIABLES | env_names(command) | OTHER_VARIABLES
    for name in stray:
        if name in RENAMED_VARIABLES:
            hint = f"it is now {RENAMED_VARIABLES[name]}"
        elif name in known:
            continue
        else:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"'{prog_name} --help' lists the variables"
        click.echo(f"{prog_name}: warning: ignoring {name}: no ps-* command reads it ({hint})", err=True)


def _version() -> str:
    try:
        return metadata.version("ormo-ps")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _complete(command: click.Command) -> None:
    """What every ps-* command has: `--version`, and each option's `PS_*` variable named in `--help`."""
    if not any("--version" in getattr(p, "opts", ()) for p in command.params):
        click.version_option(_version(), "--version", message="%(prog)s %(version)s")(command)
    for param in command.params:
        if isinstance(param, click.Option):
            param.show_envvar = True


def run_cli(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> None:
    """Run a click command with `PS_*` environment variables; return on success, SystemExit(code != 0) on failure.
    A process ps-launch started ends with ps-launch (common/parent.py)."""
    die_with_parent()
    _complete(command)
    warn_about_unknown_variables(command, prog_name)
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name=prog_name, auto_envvar_prefix="PS")
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def resolve_device(name: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA where there is one) as a device this machine has; a ValueError
    that says why otherwise."""
    import torch

    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ValueError(f"{name!r} is not a device: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA is not available on this machine")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


class Device(click.ParamType):
    """A `--device` value, checked against this machine (a usage error instead of torch's traceback)."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return resolve_device(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda where there is one)."

METRICS_PORT_HELP = ("Serve Prometheus metrics at http://HOST:PORT/metrics (counts and times; never parameters or "
                     "the token); 0 picks a free port and prints it. Off when not given.")
CLIENT_METRICS_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None, metavar="PORT",
                 help=METRICS_PORT_HELP),
    click.option("--metrics-host", default=DEFAULT_HOST, metavar="HOST",
                 help="Address the metrics endpoint binds to (0.0.0.0 in a container Prometheus scrapes)."),
]

CLIENT_PROCESS_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--server-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
                 help="Exit when the server has been unreachable this many seconds."),
    click.option("--device", type=Device(), default="cpu", help=DEVICE_HELP),
    click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's)."),
    *CLIENT_SECURITY_OPTIONS,
    *CLIENT_METRICS_OPTIONS,
    click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging."),
]


def client_process_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What every client process of a server takes: timeout, device, threads, TLS/token, metrics, logging."""
    return apply_options(CLIENT_PROCESS_OPTIONS, f)


def setup_client_process(kwargs: dict[str, Any]) -> ClientSecurity:
    """Logging (each line names the server) and torch threads from `client_process_options`; returns the
    (validated) client security."""
    setup_logging(kwargs.pop("verbose"), f"server {kwargs['server']}" if kwargs.get("server") else None)
    tune_malloc()
    threads = kwargs.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return client_security_from(kwargs)


def client_metrics(kwargs: dict[str, Any], prog: str) -> tuple[Any, MetricsEndpoint | None]:
    """The registry and endpoint `--metrics-port` asks for (None, None without it), taken from
    `client_process_options`' keyword arguments; a port in use or a bad host is the command's error."""
    port, host = kwargs.pop("metrics_port"), kwargs.pop("metrics_host")
    if port is None:
        return None, None
    registry = new_registry()
    try:
        return registry, serve_metrics(registry, host, port, prog)
    except OSError as e:
        raise click.ClickException(str(e)) from None
