"""gRPC options of every server and channel of the project: `GRPC_OPTIONS` = message size + keepalive.

Message size: tensors may travel whole (GetParameters, a Ready's parameters, clients that do not read chunks,
`--chunk-mib 0`), so both ends raise gRPC's 4 MiB default.
Keepalive: both ends notice a dead peer (a cut link, a vanished host) within about 20 s. Without it a
worker whose link is cut waits on its Train stream until TCP gives up (up to ~15 min, or forever when it
had nothing left to send), and the server keeps the dead stream open, so the worker's reconnect is refused
with ALREADY_EXISTS meanwhile. The server's options and the clients' are the same list: each side reads
the keys meant for it.
"""

from __future__ import annotations

__all__ = ["GRPC_KEEPALIVE_OPTIONS", "GRPC_MESSAGE_OPTIONS", "GRPC_OPTIONS", "KEEPALIVE_TIMEOUT_MS",
           "KEEPALIVE_TIME_MS", "MAX_MESSAGE_BYTES", "grpc_message_options"]

# A tensor may travel as one whole message (see the .proto header on chunking): a 100M-parameter float32
# vector is 400 MB, so both ends raise gRPC's 4 MiB default. 2**31 - 1 is the largest value gRPC's
# int channel argument takes and protobuf's own ceiling for one message.
MAX_MESSAGE_BYTES: int = 2**31 - 1


def grpc_message_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options raising gRPC's send and receive limits to max_bytes (-1 = unlimited)."""
    if max_bytes != -1 and not 0 < max_bytes <= MAX_MESSAGE_BYTES:
        raise ValueError(f"max_bytes must be -1 or in 1..{MAX_MESSAGE_BYTES}, got {max_bytes}")
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


GRPC_MESSAGE_OPTIONS: list[tuple[str, int]] = grpc_message_options()


def receive_limit(numel: int) -> int:
    """The largest message a server of a `numel`-parameter model needs to receive: a gradient of `numel`
    elements of up to 8 bytes (a wrong dtype still gets its INVALID_ARGUMENT) plus 1 MiB for the rest.
    Nothing larger is read: gRPC refuses a message by its length prefix, before its bytes arrive."""
    return min(MAX_MESSAGE_BYTES, numel * 8 + (1 << 20))


def client_model_receive_limit(chunk_bytes: int) -> int:
    """The receive limit of a server whose clients bring the model (`--model client`: its size is not known
    when the server starts): a chunk and 1 MiB for the rest, so a client's w_0 and gradients of any size come
    in chunks (RemoteOptimizer sends them so); with chunking off (`--chunk-mib 0`) every tensor is one
    message, up to gRPC's ceiling (2 GiB - 1: ~500M float32 parameters)."""
    return MAX_MESSAGE_BYTES if chunk_bytes == 0 else min(MAX_MESSAGE_BYTES, chunk_bytes + (1 << 20))


def server_options(numel: int, limit: int | None = None) -> list[tuple[str, int]]:
    """A ps-server's gRPC options: GRPC_OPTIONS with the receive limit of its model (or `limit`), and no
    SO_REUSEPORT (a second server on the same port must fail, not share the port silently)."""
    options = dict(GRPC_OPTIONS) | {"grpc.max_receive_message_length": limit or receive_limit(numel),
                                    "grpc.so_reuseport": 0}
    return list(options.items())

KEEPALIVE_TIME_MS: int = 10_000  # ping the peer after this long without hearing from it
KEEPALIVE_TIMEOUT_MS: int = 10_000  # and close the connection when the ping is not answered this fast

GRPC_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC core also waits this long for the answer to any ping, keepalive ones included, and it, not the
    # keepalive timeout, decides: its default of 60 s made a silent half-open link stall a run for 70 s
    # (measured through a frozen proxy: tests/test_hardening.py, bench/results/hostile.md).
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # A worker waiting for the run to start sends no data for minutes: keep pinging anyway (client side).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Server side: accept those pings; by default a server answers pings more often than every 5 min
    # without data with GOAWAY "too_many_pings", which would drop every waiting worker.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]

# Pass to every grpc.aio.server(options=...) and every channel (insecure_channel(target, options=...)).
GRPC_OPTIONS: list[tuple[str, int]] = GRPC_MESSAGE_OPTIONS + GRPC_KEEPALIVE_OPTIONS
