"""Container health probe: exit 0 only when a ps-server answers SERVING on the standard gRPC health service.

Docker Compose's healthcheck runs it in the server's container (`python /app/deploy/healthcheck.py`): with
no address it asks 127.0.0.1 on the port of `PS_BIND`, the variable the server itself listens by.
Kubernetes probes the server natively (`grpc:` probes); there the worker pods run it with `--wait` as an
init container, so they start once the server is serving. It imports only grpc, not torch: it is cheap.
Shards (`ps-shard`) serve the health service too, under the name "" only (`--service ""`); with several
addresses every one must be SERVING (a sharded server's Job waits for all its shards so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051
# The name ps-server registers in the health service (server/servicer.py SERVICE_NAME); "" is the whole server.
SERVICE_NAME = "ps.v1.ParameterServer"


def default_target() -> str:
    """127.0.0.1 on the port of PS_BIND (HOST:PORT), else on 50051."""
    port = os.environ.get("PS_BIND", "").rsplit(":", 1)[-1]
    return f"127.0.0.1:{port if port.isdigit() and int(port) > 0 else DEFAULT_PORT}"


def check(target: str, service: str = SERVICE_NAME, timeout: float = 3.0) -> str:
    """The serving status of `service` at `target` ("SERVING", "NOT_SERVING", ...), or the gRPC error code."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="*", default=[],
                        help="HOST:PORT of the server, or of each shard: all must be SERVING (default: 127.0.0.1 "
                             "and the port of $PS_BIND, else 50051)")
    parser.add_argument("--service", default=SERVICE_NAME, help="health service name to ask for ('' = the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for one check")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep checking up to this many seconds until SERVING (an init container's wait)")
    args = parser.parse_args(argv)
    waiting = list(args.target) or [default_target()]
    deadline = time.monotonic() + args.wait
    while True:
        statuses = {target: check(target, args.service, args.timeout) for target in waiting}
        waiting = [target for target, status in statuses.items() if status != "SERVING"]
        if not waiting:
            return 0
        if time.monotonic() >= deadline:
            for target in waiting:
                print(f"{target}: {statuses[target]}", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
