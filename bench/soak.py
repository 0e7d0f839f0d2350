"""Load and soak: many lightweight worker streams against one server for minutes, with churn.

Each simulated worker is one grpc.aio Train stream in a client process (no model compute): it answers
every Parameters with a gradient of the right size at once. A churn task kills random streams (cancels
them mid-flight) and reconnects them with their worker id. Reported: updates applied, gradients lost
(sent but never applied: must not exceed the streams killed with a gradient in flight), rejected
messages, the server's resident memory over time, and push latency percentiles (gradient sent to
parameters received). Writes bench/results/soak.{json,md}.

    python -m bench.soak                        # 64 and 256 streams, 3 minutes each
    python -m bench.soak --streams 64 --seconds 20
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench import harness, processes
from ormo_ps.server.serving import LISTENING_PATTERN
from ormo_ps.common.codec import encode
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.killed_in_flight = 0
        self.kills = 0
        self.reconnects = 0
        self.refused = 0
        self.latencies: list[float] = []


async def stream_worker(stub, worker: int | None, stats: Stats, stop: asyncio.Event, kill: asyncio.Event,
                        numel_box: list[int]) -> int | None:
    """One Train stream until `stop` or `kill`; returns the worker id (to reconnect with)."""
    call = stub.Train()
    reg = pb.Register(name="soak")
    if worker is not None:
        reg.requested_worker_id = worker
    in_flight = False
    try:
        await call.write(pb.WorkerMessage(register=reg))
        welcome = await call.read()
        if welcome is grpc.aio.EOF or welcome.WhichOneof("payload") != "welcome":
            stats.refused += 1
            return worker
        worker = welcome.welcome.worker_id
        numel_box[0] = welcome.welcome.config.num_parameters
        grad = pb.Gradient(loss=1.0, sample_count=1)
        encode(np.full(numel_box[0], 1e-6, dtype=np.float32), out=grad.tensor)
        await call.write(pb.WorkerMessage(ready=pb.Ready()))
        sent_at = 0.0
        while not stop.is_set():
            read = asyncio.ensure_future(call.read())
            killer = asyncio.ensure_future(kill.wait())
            done, _ = await asyncio.wait({read, killer}, return_when=asyncio.FIRST_COMPLETED)
            if killer in done:
                read.cancel()
                if in_flight:
                    stats.killed_in_flight += 1
                return worker
            killer.cancel()
            msg = read.result()
            if msg is grpc.aio.EOF or msg.WhichOneof("payload") != "parameters":
                return worker
            if in_flight:
                stats.acked += 1
                stats.latencies.append(time.perf_counter() - sent_at)
            grad.iteration_index = msg.parameters.iteration_index
            sent_at = time.perf_counter()
            await call.write(pb.WorkerMessage(gradient=grad))
            stats.sent += 1
            in_flight = True
        if in_flight:
            stats.killed_in_flight += 1  # still in flight when the run ended
        return worker
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            stats.refused += 1
        elif in_flight:
            stats.killed_in_flight += 1
        return worker
    finally:
        call.cancel()


async def drive(port: int, streams: int, seconds: float, churn_per_s: float, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    stop = asyncio.Event()
    numel = [0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        kills = [asyncio.Event() for _ in range(streams)]

        async def slot(i: int) -> None:
            worker = None
            while not stop.is_set():
                kills[i] = asyncio.Event()
                worker = await stream_worker(stub, worker, stats, stop, kills[i], numel)
                if not stop.is_set():
                    stats.reconnects += 1
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(slot(i)) for i in range(streams)]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(1.0 / churn_per_s if churn_per_s > 0 else 1.0)
            if churn_per_s > 0:
                kills[rng.randrange(streams)].set()
                stats.kills += 1
        stop.set()
        for k in kills:
            k.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)


def status(port: int) -> pb.Status:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS) as ch:
        return pb_grpc.ParameterServerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)


def one(streams: int, seconds: float, churn: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        server = processes.start(
            "ormo_ps.server.cli", ["--algo", "ormo", "--workers", str(streams), "--dataset", "digits", "--model", "mlp",
                           "--iterations", str(10**9), "--bind", "127.0.0.1:0", "--out", tmp,
                           "--checkpoint-every", "30", "--log-every", "100000", "--linger", "0"], log=log)
        try:
            port = int(processes.wait_for_line(log, LISTENING_PATTERN, server, 120).group(2))
            stats = Stats()
            memory: list[tuple[float, float]] = []
            t0 = time.monotonic()

            async def sample() -> None:
                while True:
                    memory.append((round(time.monotonic() - t0, 1), round(rss_mb(server.pid), 1)))
                    await asyncio.sleep(max(1.0, seconds / 30))

            async def main() -> None:
                sampler = asyncio.create_task(sample())
                try:
                    await drive(port, streams, seconds, churn, seed, stats)
                finally:
                    sampler.cancel()

            asyncio.run(main())
            time.sleep(0.5)
            st = status(port)
            lat = np.array(stats.latencies) * 1e3
            lost = stats.sent - st.gradients_applied
            return dict(streams=streams, seconds=seconds, churn_per_second=churn, updates_applied=st.gradients_applied,
                        updates_per_second=round(st.gradients_applied / seconds, 1), gradients_sent=stats.sent,
                        gradients_lost=lost, killed_with_gradient_in_flight=stats.killed_in_flight,
                        lost_within_in_flight=0 <= lost <= stats.killed_in_flight, kills=stats.kills,
                        reconnects=stats.reconnects, refused_reconnects=stats.refused,
                        rejected_messages=st.gradients_rejected,
                        latency_ms={p: round(float(np.percentile(lat, p)), 2) for p in (50, 90, 99, 99.9)}
                        if len(lat) else {}, memory_mb=memory,
                        memory_growth_mb=round(memory[-1][1] - memory[len(memory) // 3][1], 1) if memory else None)
        finally:
            server.kill()
            server.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = harness.parser("soak", __doc__, out="soak")
    p.add_argument("--streams", default="64,256", help="comma-separated numbers of streams, one run each")
    p.add_argument("--seconds", type=float, default=180, help="seconds per run")
    p.add_argument("--churn", type=float, default=2.0, help="stream kills per second")
    args = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        print(f"{n} streams for {args.seconds:.0f}s ...", file=sys.stderr)
        rows.append(one(n, args.seconds, args.churn, seed=n))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "memory_mb"}), file=sys.stderr)
    meta = harness.run_meta("soak", argv)
    header = ("streams", "seconds", "updates applied", "updates/s", "sent", "lost", "killed in flight", "kills",
              "rejected", "latency p50/p90/p99 (ms)", "server RSS start → end (MB)")
    cells = [(r["streams"], f"{r['seconds']:.0f}", r["updates_applied"], r["updates_per_second"], r["gradients_sent"],
              r["gradients_lost"], r["killed_with_gradient_in_flight"], r["kills"], r["rejected_messages"],
              "/".join(str(r["latency_ms"].get(q)) for q in (50, 90, 99)),
              f"{r['memory_mb'][0][1]} → {r['memory_mb'][-1][1]}") for r in rows]
    harness.save(args.out, dict(meta=meta, rows=rows), [
        "# Load and soak", "", *harness.meta_lines(meta), "Server and all streams share the machine's CPUs.", "",
        "OrMo server (digits MLP, 9,610 parameters); every stream answers each Parameters with a gradient at "
        "once; churn kills random streams mid-flight and they reconnect with their worker id.", "",
        harness.table(header, cells), "",
        "`lost` = gradients sent minus gradients the server applied; it must not exceed `killed in flight` "
        "(streams killed, or the run ended, while their gradient was on the wire). Memory over time is in "
        "the JSON file (`memory_mb`: [seconds, MB] samples)."])


if __name__ == "__main__":
    main()
