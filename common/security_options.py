"""The TLS and token options of ps-server and of its clients (ps-worker, ps-eval, ps-launch's processes),
and the `ServerSecurity` / `ClientSecurity` they make (common/security.py); a bad combination is a usage error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ormo_ps.common.security import ClientSecurity, ServerSecurity

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


def apply_options(options: list[Callable[[Any], Any]], f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        f = option(f)
    return f


def server_security_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return apply_options(SERVER_SECURITY_OPTIONS, f)


def client_security_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return apply_options(CLIENT_SECURITY_OPTIONS, f)


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
