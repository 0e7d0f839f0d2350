"""gRPC keepalive options: both ends notice a dead peer (a cut link, a vanished host) within about 20 s.

Without them a worker whose link is cut waits on its Train stream until TCP gives up (up to ~15 min, or
forever when it had nothing left to send), and the server keeps the dead stream open, so the worker's
reconnect is refused with ALREADY_EXISTS meanwhile. Append to the message-size options on every
`grpc.aio.server(options=...)` and every worker channel.
"""

from __future__ import annotations

__all__ = ["GRPC_KEEPALIVE_OPTIONS", "KEEPALIVE_TIMEOUT_MS", "KEEPALIVE_TIME_MS"]

KEEPALIVE_TIME_MS: int = 10_000  # ping the peer after this long without hearing from it
KEEPALIVE_TIMEOUT_MS: int = 10_000  # and close the connection when the ping is not answered this fast

GRPC_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # A worker waiting for the run to start sends no data for minutes: keep pinging anyway (client side).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Server side: accept those pings; by default a server answers pings more often than every 5 min
    # without data with GOAWAY "too_many_pings", which would drop every waiting worker.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]
