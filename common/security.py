"""Transport security: TLS (optionally mutual) and a shared token checked on every call but health.

The server side is `server_credentials()` plus `TokenInterceptor`; clients build their channel with
`client_channel()` and send `call_metadata()` with every call. The token travels as
`authorization: Bearer <token>` and is compared in constant time. Plaintext without a token stays the
default only on loopback: `warn_if_exposed()` logs a warning for any other bind address.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from ormo_ps.common.log_limit import LimitedLog, shorten

logger = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Calls that never need the token: probes of the standard health service.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def _token(token: str | None, token_file: str | None) -> str | None:
    if token is not None and token_file:
        raise ValueError("give the token either directly or as a file, not both")
    if token_file:
        token = (_read(token_file, "token file") or b"").decode().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    elif token is not None and not token.strip():
        # An empty token given on purpose must not silently mean "no authentication" (an unset PS_TOKEN,
        # or an empty one, which click ignores, is no token at all).
        raise ValueError("the token is empty; leave --token out to run without one")
    return token or None


@dataclass(frozen=True)
class _Identity:
    """What either end may hold: a certificate with its private key, and the shared token (or its file)."""

    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        _token(self.token, self.token_file)  # an empty or doubly given token is an error at once

    @property
    def resolved_token(self) -> str | None:
        return _token(self.token, self.token_file)


@dataclass(frozen=True)
class ServerSecurity(_Identity):
    """`--tls-cert/--tls-key` turn on TLS; `--tls-client-ca` requires client certificates (mutual TLS)."""

    tls_client_ca: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        pair = (_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        client_ca = _read(self.tls_client_ca, "client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        token = self.resolved_token
        return [TokenInterceptor(token)] if token else []


@dataclass(frozen=True)
class ClientSecurity(_Identity):
    """`--tls-ca` trusts the server's certificate (TLS on); `--tls-cert/--tls-key` present a client one."""

    tls_ca: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls_cert and not self.tls_ca:
            raise ValueError("a client certificate (mutual TLS) needs tls_ca too")

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.resolved_token
        return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()

    def _options(self, options: list[tuple[str, object]]) -> list[tuple[str, object]]:
        if self.tls_server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.tls_server_name)]
        return options

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "TLS CA"),
                                            private_key=_read(self.tls_key, "TLS key"),
                                            certificate_chain=_read(self.tls_cert, "TLS certificate"))

    def aio_channel(self, target: str, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=self._options(options))
        return grpc.aio.secure_channel(target, creds, options=self._options(options))

    def channel(self, target: str, options: list[tuple[str, object]]) -> grpc.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=self._options(options))
        return grpc.secure_channel(target, creds, options=self._options(options))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <token>`, except the health service's."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def refuse(request_iterator, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        # A streaming handler for every method, unary ones included, that never reads its request: the
        # refused client's message is not received into memory beyond the transport's flow-control window
        # (a unary handler would read all of it, up to the message size limit, before refusing).
        self._refuse = grpc.stream_stream_rpc_method_handler(refuse)
        self._log = LimitedLog(logger, "refused calls")

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == AUTH_HEADER]
        if len(given) == 1 and hmac.compare_digest(str(given[0]).encode(), self._expected):
            return await continuation(handler_call_details)
        why = "ambiguous credentials (several authorization headers)" if len(given) > 1 else "missing or wrong token"
        self._log.warning("refused %s: %s", shorten(method), why)
        return self._refuse


def is_loopback(bind: str) -> bool:
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(bind: str, security: ServerSecurity) -> None:
    if not is_loopback(bind) and not security.tls_cert and not security.resolved_token:
        logger.warning("listening on %s without TLS or a token: anyone who reaches this address can join "
                       "the run and read its parameters (see --tls-cert/--tls-key and --token)", bind)
