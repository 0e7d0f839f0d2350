"""The hostile-client probes of issue #11, re-run against real ps-server processes on loopback.

    python -m bench.hostile            # about 3 minutes; writes bench/results/hostile.json and prints a summary

Each probe starts its own server (digits, MLP) and client processes, does what a hostile or careless client
(or a full disk) did, and records what happened: exit codes, status codes, the server's memory (VmRSS), the
time a run stalled, the bytes added to the log. tests/test_hardening.py checks the same behaviours.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench import harness, processes
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS, KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.server.serving import LISTENING_PATTERN
from tests import small_disk
from tests.freezable_proxy import FreezableProxy

ROOT = harness.REPO
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONUNBUFFERED": "1"}
RUN = ["--workers", "2", "--dataset", "digits", "--model", "mlp", "--batch-size", "32"]


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=ENV, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, text=True)

    def port(self, timeout: float = 60) -> int:
        return int(processes.wait_for_line(self.log, LISTENING_PATTERN, self.proc, timeout).group(2))

    def wait_for(self, text: str, timeout: float = 60) -> float:
        start = time.monotonic()
        while text not in self.log.read_text():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{text!r} not in {self.log}")
            time.sleep(0.1)
        return time.monotonic() - start

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith("Error:")]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


def server(work: Path, name: str, *flags: str) -> Proc:
    return Proc(["ormo_ps.server.cli", *RUN, "--bind", "127.0.0.1:0", "--out", str(work / name), *flags], work / f"{name}.log")


def ps_server(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ormo_ps.server.cli", *flags], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


def unary(port: int, method: str, payload: bytes, metadata=None) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(payload, timeout=60, metadata=metadata)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def big_request(megabytes: int) -> bytes:
    """A GetParametersRequest carrying `megabytes` MB in an unknown field (number 100, length-delimited)."""
    size = megabytes << 20
    return _varint(100 << 3 | 2) + _varint(size) + bytes(size)


def probe_memory(work: Path) -> dict[str, Any]:
    s = server(work, "memory", "--iterations", "1000", "--token", "s3cret")
    try:
        port = s.port()
        unary(port, "/ps.v1.ParameterServer/GetStatus", b"", (("authorization", "Bearer s3cret"),))
        rss = {"idle": s.rss_mib()}
        payload = big_request(200)
        rss_codes = unary(port, "/ps.v1.ParameterServer/GetParameters", payload)
        rss["after one unauthenticated 200 MB request"] = s.rss_mib()
        with ThreadPoolExecutor(4) as pool:
            four = list(pool.map(lambda _: unary(port, "/ps.v1.ParameterServer/GetParameters", payload), range(4)))
        rss["after four at once"] = s.rss_mib()
        authed = unary(port, "/ps.v1.ParameterServer/GetParameters", payload, (("authorization", "Bearer s3cret"),))
        rss["after an authenticated 200 MB request"] = s.rss_mib()
        return {"rss_mib": rss, "unauthenticated": rss_codes, "four_at_once": four, "authenticated": authed}
    finally:
        s.stop()


def probe_port_in_use(work: Path) -> dict[str, Any]:
    a = server(work, "port-a", "--iterations", "100000")
    try:
        port = a.port()
        b = ps_server(*RUN, "--bind", f"127.0.0.1:{port}", "--out", str(work / "port-b"))
        answered = [unary(port, "/ps.v1.ParameterServer/GetStatus", b"") for _ in range(20)]
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            c = ps_server(*RUN, "--bind", f"127.0.0.1:{other.getsockname()[1]}", "--out", str(work / "port-c"))
        return {"second_server_exit": b.returncode, "second_server_stderr": b.stderr.strip().splitlines(),
                "twenty_connections_answered_by_the_first": answered.count("OK"),
                "socket_held_exit": c.returncode, "socket_held_stderr": c.stderr.strip().splitlines()}
    finally:
        a.stop()


def probe_ready(work: Path) -> dict[str, Any]:
    s = server(work, "ready", "--iterations", "60", "--ready-timeout", "5", "--linger", "5")
    streams = []
    try:
        port = s.port()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS)
        train = channel.stream_stream("/ps.v1.ParameterServer/Train",
                                      request_serializer=pb.WorkerMessage.SerializeToString,
                                      response_deserializer=pb.ServerMessage.FromString)
        hold = threading.Event()

        def squat():  # register, then never say Ready (and never hang up)
            yield pb.WorkerMessage(register=pb.Register(name="squatter"))
            hold.wait(120)

        for _ in range(2):
            call = train(squat(), timeout=60)
            next(call)
            streams.append(call)
        started = time.monotonic()
        w = [Proc(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1"], work / f"ready-w{i}.log")
             for i in range(2)]
        codes = []
        for call in streams:
            try:
                next(call)
            except grpc.RpcError as e:
                codes.append(f"{e.code().name}: {e.details()}")
        exits = [p.proc.wait(120) for p in w]
        hold.set()
        waited = any("all worker slots are taken" in p.log.read_text() for p in w)
        return {"squatters_ended_with": codes, "workers_exit": exits, "workers_waited_for_a_slot": waited,
                "seconds_until_the_workers_finished": round(time.monotonic() - started, 1)}
    finally:
        s.stop()


def probe_huge_values(work: Path) -> dict[str, Any]:
    s = server(work, "lr", "--lr", "1e30", "--iterations", "2000", "--linger", "15")
    try:
        port = s.port()
        w = [Proc(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1"], work / f"lr-w{i}.log")
             for i in range(2)]
        start = time.monotonic()
        exit_server = s.proc.wait(120)
        seconds = round(time.monotonic() - start, 1)
        return {"server_exit": exit_server, "server_error": s.errors(), "seconds_to_end": seconds,
                "worker_exits": [p.proc.wait(60) for p in w], "worker_errors": [p.errors() for p in w]}
    finally:
        s.stop()


def probe_half_open(work: Path) -> dict[str, Any]:
    s = server(work, "half-open", "--algo", "ssgd", "--iterations", "1000000", "--log-every", "10",
               "--sync-timeout", "600")
    workers, proxy = [], None
    try:
        port = s.port()
        proxy = FreezableProxy(("127.0.0.1", port))
        workers = [Proc(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{p}", "--threads", "1", "--name", name,
                         "--server-timeout", "120"], work / f"half-open-{name}.log")
                   for p, name in ((proxy.port, "behind-proxy"), (port, "direct"))]
        s.wait_for("iter 100/")
        proxy.freeze()
        stall = s.wait_for("disconnected", 180)
        return {"stall_seconds": round(stall, 1),
                "keepalive_bound_seconds": (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000}
    finally:
        if proxy:
            proxy.close()
        s.stop()
        for p in workers:
            p.stop()


def probe_cli_mistakes(work: Path) -> dict[str, Any]:
    (work / "empty-token").write_text("\n")
    (work / "a-file").write_text("")
    evil = work / "evil"
    evil.mkdir()
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'pwned'}",))

    (evil / "checkpoint.pt").write_bytes(pickle.dumps({"x": Evil()}))
    cases = {
        "--token ''": ps_server("--token", ""),
        "--token-file (empty)": ps_server("--token-file", str(work / "empty-token")),
        "--out under a file": ps_server("--out", str(work / "a-file" / "out")),
        "--resume a checkpoint torch refuses": ps_server("--resume", str(evil), "--out", str(work / "evil-out")),
    }
    out = {name: {"exit": r.returncode, "stderr": r.stderr.strip().splitlines()[-1:],
                  "traceback": "Traceback" in r.stderr} for name, r in cases.items()}
    out["--resume a checkpoint torch refuses"]["code_ran"] = (work / "pwned").exists()
    return out


def probe_log_flood(work: Path) -> dict[str, Any]:
    s = server(work, "flood", "--iterations", "1000", "--token", "s3cret")
    try:
        port = s.port()
        before = s.log.stat().st_size
        start = time.monotonic()
        codes = [unary(port, "/" + "x" * 8000, b"") for _ in range(1021)]
        seconds = time.monotonic() - start
        time.sleep(0.5)
        grown = s.log.stat().st_size - before
        two = unary(port, "/ps.v1.ParameterServer/GetStatus", b"",
                    (("authorization", "Bearer s3cret"), ("authorization", "Bearer wrong")))
        return {"calls": len(codes), "codes": sorted(set(codes)), "seconds": round(seconds, 1),
                "log_bytes_added": grown, "two_authorization_headers": two}
    finally:
        s.stop()


def probe_disk_full(work: Path) -> dict[str, Any]:
    if (why := small_disk.unavailable()) is not None:
        return {"skipped": why}
    (work / "disk").mkdir()
    server_on_disk = small_disk.ServerOnSmallDisk(
        work / "disk", work / "disk.log", [*RUN, "--iterations", "1000000", "--bind", "127.0.0.1:0",
                                           "--checkpoint-every", "0.3", "--log-every", "20"], cwd=ROOT, env=ENV)
    workers = []
    try:
        port = server_on_disk.port()
        workers = [Proc(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1", "--server-timeout", "3"],
                        work / f"disk-w{i}.log") for i in range(2)]
        server_on_disk.wait_for("checkpoint at iteration")
        server_on_disk.fill()
        full_at = server_on_disk.log.read_text().count("\n")
        time.sleep(5)
        after = server_on_disk.log.read_text().splitlines()[full_at:]
        iterations = [int(x.split("iter ")[1].split("/")[0]) for x in after if "ormo_ps.server.service: iter " in x]
        exit_code = server_on_disk.sigterm()
        text = server_on_disk.log.read_text()
        return {"iterations_while_full": [iterations[0], iterations[-1]] if iterations else None,
                "checkpoint_errors_logged": sum("cannot write the checkpoint" in x for x in after),
                "metrics_errors_logged": sum("cannot write metrics" in x for x in after),
                "sigterm_exit": exit_code,
                "sigterm_error": [x for x in text.splitlines() if x.startswith("Error:")],
                "tmp_files_left": [p.name for p in server_on_disk.disk.glob(".*.tmp")],
                "traceback": "Traceback" in text or "never retrieved" in text}
    finally:
        server_on_disk.close()
        for p in workers:
            p.stop()


# ----- issue #21: one worker's faults, chunks, streams that never register -----------------------------------
TOKEN = (("authorization", "Bearer s3cret"),)


class RunEnded(Exception):
    """The server answered a Register with Stop."""


class Stream:
    """A hand-driven Train stream with the token (synchronous gRPC; requests through a queue)."""

    def __init__(self, target: str, deadline: float = 60.0, channel: grpc.Channel | None = None) -> None:
        import queue

        self._own = channel is None  # a stream of its own connection, closed with it
        self.channel = channel or grpc.insecure_channel(target, options=GRPC_MESSAGE_OPTIONS)
        self._requests: queue.Queue = queue.Queue()
        train = self.channel.stream_stream("/ps.v1.ParameterServer/Train", request_serializer=lambda m: m
                                           if isinstance(m, bytes) else m.SerializeToString(),
                                           response_deserializer=pb.ServerMessage.FromString)
        self.call = train(iter(self._requests.get, None), timeout=deadline, metadata=TOKEN)

    def send(self, message: pb.WorkerMessage | bytes) -> None:
        self._requests.put(message)

    def recv(self) -> pb.ServerMessage:
        return next(self.call)

    def parameters(self) -> pb.Parameters:
        """The next parameters (reading their chunks, if any)."""
        msg = self.recv()
        while msg.WhichOneof("payload") == "chunk":
            msg = self.recv()
        params = msg.parameters
        for _ in range(-(-params.tensor.numel * 4 // max(1, self.chunk)) if params.tensor.chunked else 0):
            self.recv()
        return params

    def join(self, worker: int | None = None, accepts_chunks: bool = False) -> int:
        """Register (asking for `worker`), say Ready, take w_0 or the current parameters; their index."""
        reg = pb.Register(name="hostile", accepts_chunks=accepts_chunks)
        if worker is not None:
            reg.requested_worker_id = worker
        self.send(pb.WorkerMessage(register=reg))
        first = self.recv()
        if first.WhichOneof("payload") == "stop":  # the run is over: a newcomer is told why
            raise RunEnded(f"Stop {pb.StopReason.Name(first.stop.reason)}: {first.stop.detail}")
        welcome = first.welcome
        self.chunk, self.numel, self.worker = welcome.chunk_bytes, welcome.config.num_parameters, welcome.worker_id
        self.send(pb.WorkerMessage(ready=pb.Ready()))
        return self.parameters().iteration_index

    def outcome(self) -> str:
        """How the stream went on: the next message's kind, or the status it ended with."""
        try:
            return self.recv().WhichOneof("payload")
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        if self._own:
            self.channel.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe_nan_worker(work: Path) -> dict[str, Any]:
    """Three NaN gradients from one client, reconnecting between them, while an honest worker trains."""
    import numpy as np

    from ormo_ps.common.wire import gradient_messages

    s = server(work, "nan", "--iterations", "100", "--token", "s3cret", "--linger", "5")
    try:
        port = s.port()
        # The honest worker computes each gradient 50x slower than it could (~50-100 ms): the faulty client's
        # reconnects (one connection, a stream each) fit between two of its gradients, as on a real model.
        honest = Proc(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1", "--token", "s3cret",
                       "--slowdown", "50"], work / "nan-honest.log")
        outcomes, worker, started = [], None, time.monotonic()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS)
        for _ in range(6):
            stream = Stream(f"127.0.0.1:{port}", channel=channel)
            try:
                held = stream.join(worker)
                worker = stream.worker
                stream.send(gradient_messages(np.full(stream.numel, np.nan, dtype=np.float32), held, 1.0)[0])
                outcomes.append(stream.outcome())
            except grpc.RpcError as e:
                outcomes.append(f"{e.code().name}: {e.details()}")
            except RunEnded as e:
                outcomes.append(f"the run had ended: {e}")
            finally:
                stream.close()
            if any(w in outcomes[-1] for w in ("dropped", "diverged", "UNAVAILABLE", "ended")):
                break
        seconds = round(time.monotonic() - started, 2)
        channel.close()
        server_exit = s.proc.wait(120)
        log = s.log.read_text()
        return {"nan_client_outcomes": [o[:160] for o in outcomes], "seconds": seconds, "server_exit": server_exit,
                "server_error": s.errors(), "run_finished": "run finished at iteration 100" in log,
                "honest_worker_exit": honest.proc.wait(60)}
    finally:
        s.stop()


def probe_chunks(work: Path) -> dict[str, Any]:
    """A gradient in 1-byte chunks, a chunk larger than negotiated, and chunks a client did not negotiate."""
    import numpy as np

    from ormo_ps.common.chunks import MIB
    from ormo_ps.common.wire import gradient_messages

    result: dict[str, Any] = {}
    s = server(work, "chunks", "--iterations", "100000", "--token", "s3cret", "--chunk-mib", "0.01",
               "--workers", "1")
    try:
        port = s.port()
        stream = Stream(f"127.0.0.1:{port}")
        held = stream.join(accepts_chunks=True)
        header = gradient_messages(np.zeros(stream.numel, dtype=np.float32), held, 1.0, 0, stream.chunk)[0]
        tiny = [pb.WorkerMessage(chunk=pb.TensorChunk(offset=i, data=b"\0")) for i in range(2000)]
        before = cpu_seconds(s.proc.pid)
        stream.send(header)
        for m in tiny:
            stream.send(m)
        time.sleep(3.0)  # bounded: 2000 chunks, then look
        used = cpu_seconds(s.proc.pid) - before
        status = s.log.read_text().count("bad gradient chunk")
        result["1-byte chunks"] = {"sent": len(tiny), "server_cpu_seconds": round(used, 3),
                                   "cpu_us_per_chunk": round(1e6 * used / len(tiny), 1),
                                   "refused_in_the_log": status > 0,
                                   "a 4.9 MB gradient in 1-byte chunks, server minutes": round(
                                       used / len(tiny) * 4.9e6 / 60, 1)}
        stream.close()
        stream = Stream(f"127.0.0.1:{port}")
        held = stream.join(0, accepts_chunks=True)
        stream.send(header)
        stream.send(pb.WorkerMessage(chunk=pb.TensorChunk(offset=0, data=bytes(2 * stream.chunk))))
        stream.send(pb.WorkerMessage(chunk=pb.TensorChunk(offset=2 * stream.chunk,
                                                          data=bytes(4 * stream.numel - 2 * stream.chunk))))
        result["a chunk twice the chunk size (then the rest)"] = stream.outcome()[:200]
        stream.close()
    finally:
        s.stop()
    for flags, accepts in ((("--chunk-mib", "4"), False), (("--chunk-mib", "0"), True)):
        s = server(work, "unnegotiated", "--iterations", "100000", "--token", "s3cret", "--workers", "1", *flags)
        try:
            stream = Stream(f"127.0.0.1:{s.port()}")
            held = stream.join(accepts_chunks=accepts)
            for m in gradient_messages(np.zeros(stream.numel, dtype=np.float32), held, 1.0, 0, round(0.01 * MIB)):
                stream.send(m)
            who = "a client that did not set accepts_chunks" if not accepts else "--chunk-mib 0"
            result[f"chunked gradient from {who}"] = stream.outcome()[:200]
            stream.close()
        finally:
            s.stop()
    return result


def probe_pending(work: Path) -> dict[str, Any]:
    """Train streams that never send Register; streams that send 8 MiB of a first message and stop."""
    supported = "--first-message-timeout" in ps_server("--help").stdout
    deadline = ("--first-message-timeout", "3") if supported else ()
    s = server(work, "pending", "--iterations", "100000", "--token", "s3cret", *deadline)
    streams: list[Any] = []
    try:
        port = s.port()
        rss = {"idle": s.rss_mib()}
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_MESSAGE_OPTIONS)
        train = channel.stream_stream("/ps.v1.ParameterServer/Train", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
        hold = threading.Event()

        def silent():
            hold.wait(60)
            yield from ()

        streams = [train(silent(), timeout=60, metadata=TOKEN) for _ in range(300)]
        time.sleep(1.0)
        refused_at_once = sum(1 for c in streams if c.done())
        time.sleep(6.0)  # past the deadline
        open_after_7s = sum(1 for c in streams if not c.done())
        codes = sorted({c.code().name for c in streams if c.done()})
        hold.set()
        channel.close()
    finally:
        s.stop()
    # Waves of 20 streams, each sending 8 MiB of a 9 MB first message through a proxy that forwards no more
    # (the model has 11M parameters, so the receive limit, 89 MB, lets such a message in); each wave's client
    # side is closed after 5 s, then the next comes.
    s = Proc(["ormo_ps.server.cli", "--workers", "2", "--dataset", "digits", "--model", "tests.big_models:wide",
              "--batch-size", "32", "--iterations", "100000", "--bind", "127.0.0.1:0", "--out", str(work / "big"),
              "--token", "s3cret", *deadline], work / "big.log")
    waves = []
    try:
        port = s.port(timeout=120)
        idle = s.rss_mib()
        first = pb.WorkerMessage(register=pb.Register(name="x" * (9 << 20))).SerializeToString()
        for _ in range(6):
            proxies, calls = [], []
            for _ in range(20):
                proxy = FreezableProxy(("127.0.0.1", port), upstream_budget=8 << 20)
                proxies.append(proxy)
                ch = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=GRPC_MESSAGE_OPTIONS)
                call = ch.stream_stream("/ps.v1.ParameterServer/Train", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)(iter([first]), timeout=60,
                                                                           metadata=TOKEN)
                calls.append((ch, call))
            time.sleep(2.5)
            holding = s.rss_mib()
            time.sleep(2.5)
            waves.append({"rss_mib_holding": holding, "ended_by_the_server_within_5s": sum(
                1 for _, c in calls if c.done())})
            for ch, _ in calls:
                ch.close()
            for proxy in proxies:
                proxy.close()
            time.sleep(1.0)
        after = s.rss_mib()
    finally:
        s.stop()
    return {"first_message_deadline": deadline[1] + " s" if deadline else "none",
            "300 silent streams": {"refused_at_once": refused_at_once, "still_open_after_7s": open_after_7s,
                                   "codes": codes},
            "rss_mib": rss, "waves of 20 streams, 8 MiB of a first message each": {
                "rss_mib_idle": idle, "waves": waves, "rss_mib_after": after}}


PROBES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "1 memory before authentication": probe_memory,
    "2 a second server on the same port": probe_port_in_use,
    "3 slots held without Ready": probe_ready,
    "4 huge values (--lr 1e30, two real workers)": probe_huge_values,
    "5 a silent half-open link (synchronous K=2)": probe_half_open,
    "6 a full disk mid-run": probe_disk_full,
    "7, 8 mistakes on the command line": probe_cli_mistakes,
    "9 log flooding and two authorization headers": probe_log_flood,
    "10 one worker's NaN gradients (K=2, an honest worker training)": probe_nan_worker,
    "11 chunks: 1-byte, oversized, not negotiated": probe_chunks,
    "12 streams that never register": probe_pending,
}


def main(argv: list[str] | None = None) -> None:
    p = harness.parser("hostile", __doc__, out="hostile.json")
    p.add_argument("--only", default=None, help="run only probes whose name contains this")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"meta": harness.run_meta("hostile", argv)}
    with tempfile.TemporaryDirectory(prefix="ormo-hostile-") as tmp:
        for name, probe in PROBES.items():
            if args.only and args.only not in name:
                continue
            print(f"probe {name} ...", file=sys.stderr, flush=True)
            work = Path(tmp) / name.split()[0].replace(",", "")
            work.mkdir(exist_ok=True)
            started = time.monotonic()
            results[name] = probe(work) | {"probe_seconds": round(time.monotonic() - started, 1)}
            print(json.dumps(results[name], indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
