"""What bounds a large tensor's round trip over gRPC: HTTP/2 options against chunking (issue #13's first lever).

    python -m bench.transport_probe                 # about 3 minutes; bench/results/transport_probe.{json,md}
    python -m bench.transport_probe --quick         # seconds (the tests)

A raw-bytes echo, no protobuf and no project code: an echo server in its own process (`--serve`, grpc.aio,
one bidirectional stream, every message written back as it arrives) and a client that sends SIZE bytes and
reads SIZE bytes back, ROUNDS times, on loopback. Two ways to send SIZE bytes are compared:

- whole: one message of SIZE bytes (what ps-server and ps-worker do today), under gRPC's defaults and under
  each HTTP/2 / TCP option the issue names (flow-control BDP probing, frame size, lookahead, write buffer,
  TCP read chunk sizes), set on both ends;
- chunked: SIZE bytes as consecutive messages of CHUNK bytes on the same stream, written while the echoed
  chunks are read, so sending, receiving and copying overlap.

Sizes: 1.1 MB (ResNet20, 0.27M float32 parameters), 44 MB (11M, a ResNet-18) and 100 MB (25M, a ResNet-50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from bench import harness, processes

MB = 1_000_000
SIZES = {"ResNet20 (0.27M)": 1_100_000, "11M": 44 * MB, "25M": 100 * MB}
BASE = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
# The HTTP/2 and TCP options of issue #13, each alone (set on the server and the channel alike).
OPTIONS = {
    "defaults": [],
    "no BDP probing": [("grpc.http2.bdp_probe", 0)],
    "max frame 16 MiB": [("grpc.http2.max_frame_size", 16 * 2**20 - 1)],
    "lookahead 64 MiB": [("grpc.http2.lookahead_bytes", 64 * 2**20)],
    "write buffer 64 MiB": [("grpc.http2.write_buffer_size", 64 * 2**20)],
    "TCP read chunks 1-16 MiB": [("grpc.experimental.tcp_read_chunk_size", 4 * 2**20),
                                 ("grpc.experimental.tcp_min_read_chunk_size", 2**20),
                                 ("grpc.experimental.tcp_max_read_chunk_size", 16 * 2**20)],
}
CHUNKS = [256 * 1024, 1 * MB, 4 * MB, 8 * MB]


def _identity(b: bytes) -> bytes:
    return b


async def _serve(options: list[tuple[str, int]]) -> None:
    import grpc

    async def echo(requests, context):
        async for message in requests:
            yield message

    server = grpc.aio.server(options=BASE + options)
    handler = grpc.stream_stream_rpc_method_handler(echo, _identity, _identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("Echo", {"E": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination(timeout=600)  # bounded: the client stops it long before


async def _round_trips(port: int, options: list[tuple[str, int]], size: int, chunk: int, rounds: int) -> float:
    """Seconds per round trip of `size` bytes sent as messages of `chunk` bytes (the median of `rounds`)."""
    import grpc

    payload = memoryview(b"\x01" * size)
    pieces = [bytes(payload[i:i + chunk]) for i in range(0, size, chunk)]
    times = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BASE + options) as channel:
        call = channel.stream_stream("/Echo/E", request_serializer=_identity, response_deserializer=_identity)()

        async def one() -> None:
            async def write() -> None:
                for piece in pieces:
                    await call.write(piece)

            writer = asyncio.create_task(write())
            got = 0
            while got < size:
                got += len(await call.read())
            await writer

        await asyncio.wait_for(one(), 60)  # warm-up: connection, windows
        for _ in range(rounds):
            start = time.perf_counter()
            await asyncio.wait_for(one(), 60)
            times.append(time.perf_counter() - start)
        await call.done_writing()
    return statistics.median(times)


def measure(name: str, options: list[tuple[str, int]], size: int, chunk: int, rounds: int, log: Path) -> float:
    """Round trips per second through a fresh echo server process started with `options`."""
    server = processes.start("bench.transport_probe", ["--serve", json.dumps(options)], log=log)
    try:
        port = int(processes.wait_for_line(log, r"listening on 127\.0\.0\.1:(\d+)", server, 60,
                                           offset=0)[1])
        seconds = asyncio.run(_round_trips(port, options, size, chunk, rounds))
    finally:
        server.terminate()
        server.wait(10)
    log.unlink(missing_ok=True)
    rate = 1 / seconds
    print(f"{name}: {size / MB:.1f} MB in chunks of {min(chunk, size) / MB:.2f} MB: {rate:.2f} round trips/s "
          f"({2 * size * rate / MB:.0f} MB/s)", file=sys.stderr)
    return rate


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("transport_probe", __doc__, out="transport_probe")
    p.add_argument("--quick", action="store_true", help="one small size, two rounds (the tests)")
    p.add_argument("--rounds", type=int, default=7, help="timed round trips per cell (median)")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the echo server process
    args = p.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve([tuple(o) for o in json.loads(args.serve)]))
        return {}
    sizes = {"4 MB": 4 * MB} if args.quick else SIZES
    rounds = 2 if args.quick else args.rounds
    log = Path(args.out).with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    options_rows, chunk_rows, results = [], [], []
    for label, size in sizes.items():
        whole = {}
        tried = (OPTIONS if size >= 10 * MB else {"defaults": []}) if not args.quick else \
            {k: OPTIONS[k] for k in ("defaults", "no BDP probing")}
        for name, options in tried.items():
            whole[name] = measure(name, options, size, size, rounds, log)
            results.append(dict(size=size, chunk=size, options=name, per_second=whole[name]))
        for name, rate in whole.items():
            options_rows.append((label, name, f"{rate:.2f}", f"{rate / whole['defaults']:.2f}x"))
        for chunk in ([MB] if args.quick else CHUNKS):
            if chunk >= size:
                continue
            rate = measure("defaults", [], size, chunk, rounds, log)
            results.append(dict(size=size, chunk=chunk, options="defaults", per_second=rate))
            chunk_rows.append((label, f"{chunk / MB:.3g}", f"{rate:.2f}", f"{2 * size * rate / MB:,.0f}",
                               f"**{rate / whole['defaults']:.2f}x**"))
        chunk_rows.append((label, "whole", f"{whole['defaults']:.2f}", f"{2 * size * whole['defaults'] / MB:,.0f}",
                           "1.00x"))
    meta = harness.run_meta("transport_probe", argv)
    result = dict(meta=meta, rounds=rounds, results=results)
    harness.save(Path(args.out), result, [
        "# What bounds a large tensor's round trip over gRPC: options against chunking", "",
        *harness.meta_lines(meta),
        f"Raw-bytes grpc.aio echo on loopback (server and client in separate processes, one stream); the median "
        f"of {rounds} timed round trips per cell after a warm-up one.", "",
        "## Whole messages: gRPC's HTTP/2 and TCP options (both ends)", "",
        harness.table(["size", "options", "round trips/s", "vs. defaults"], options_rows), "",
        "## The same bytes in chunks on one stream (defaults)", "",
        harness.table(["size", "chunk (MB)", "round trips/s", "MB/s both ways", "vs. one whole message"],
                      chunk_rows), "",
        *([] if args.quick else [harness.prose("transport_probe")])])
    return result


if __name__ == "__main__":
    main()
