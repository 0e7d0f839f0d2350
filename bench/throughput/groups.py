"""The processes of one system under test: its server, its K pushers (or torch ranks), its control file.

A group starts paused (a flag in the control file: each pusher finishes its round trip and holds), is
resumed and paused around each measurement window, and is closed with a stop flag, after which the final
counts are read and every process of the group is ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import processes
from ormo_ps.server.serving import LISTENING_PATTERN
from bench.grad_pusher import (
    APPLIED, COLUMNS, DONE, DOWN_BYTES, ERROR, FAILED, NUMEL, PAUSE, PAUSED, PID, READY, REPLIES, REPLY_NS_A,
    REPLY_NS_B, SENT, SERVER_PID, STATE, STOP, UP_BYTES,
)
from bench.throughput.plan import SIZES

START_TIMEOUT = 120.0  # seconds for a group to get every process ready (K=64 torch ranks on 2 cores: ~70 s)
STOP_TIMEOUT = 20.0

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child before exec: SIGKILL it if the benchmark dies
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of its thread `tid` (0 once it is gone)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (user, nice, system, interrupts, steal: everything but idle and
    iowait), kernel work for loopback TCP included, which no process's own counters show."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Group:
    """One system under test: its server process, its K pushers, its control file, one process group."""

    system: str
    k: int
    numel: int
    workdir: Path
    control: np.memmap
    procs: list[subprocess.Popen] = field(default_factory=list)
    server: subprocess.Popen | None = None
    target: str | None = None
    paused: bool = True  # groups start paused (see _new_control)
    _channel: object = None
    _stub: object = None
    final: dict = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    @property
    def pushers(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p is not self.server]

    def spawn(self, module: str, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python -m MODULE ARGS` in this group's process group, output to WORKDIR/NAME.{out,err}."""
        p = processes.start(module, args, log=self.workdir / f"{name}.out", err=self.workdir / f"{name}.err",
                            env={**os.environ, **env} if env else None,
                            process_group=self.procs[0].pid if self.procs else 0, preexec_fn=_die_with_parent)
        self.procs.append(p)
        return p

    def log_tail(self, name: str, lines: int = 15) -> str:
        return processes.tail(self.workdir / f"{name}.err", self.workdir / f"{name}.out", lines=lines)

    def wait_for_address(self, name: str, proc: subprocess.Popen, pattern: str, timeout: float) -> str:
        """HOST:PORT from the first match of `pattern` (groups: host, port) in NAME's output, once it is there."""
        m = processes.wait_for_line(self.workdir / f"{name}.out", pattern, proc, timeout,
                                    show=(self.workdir / f"{name}.err", self.workdir / f"{name}.out"))
        return f"{m.group(1)}:{m.group(2)}"

    # -- counters
    def applied(self) -> int:
        """Updates applied (gradients echoed) by the server so far."""
        if self.system.startswith("torch-rpc"):
            return int(self.control[-1, APPLIED])
        import grpc

        from ormo_ps.common.pb import parameter_server_pb2 as pb
        from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc

        if self._stub is None:
            self._channel = grpc.insecure_channel(self.target)
            self._stub = pb_grpc.ParameterServerStub(self._channel)
        return int(self._stub.GetStatus(pb.GetStatusRequest(), timeout=10.0).gradients_applied)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pusher's reply count and the monotonic_ns time of its latest reply, consistent per row."""
        n = np.zeros(self.k, dtype=np.int64)
        ns = np.zeros(self.k, dtype=np.int64)
        for i in range(self.k):
            row = self.control[i]
            for _ in range(1000):  # the pusher writes NS_A, REPLIES, NS_B: equal NS_A and NS_B = a pair
                b = int(row[REPLY_NS_B])
                count = int(row[REPLIES])
                if int(row[REPLY_NS_A]) == b:
                    break
            n[i], ns[i] = count, b
        return n, ns

    def column(self, col: int) -> int:
        return int(self.control[: self.k, col].sum())

    def cpu(self) -> tuple[float, float, float, float]:
        """CPU seconds of (the server process, all the pushers, the server's main thread, the whole machine); the
        processes write their pids themselves. The main thread of ps-server and the echo runs their event loop."""
        server = int(self.control[-1, SERVER_PID]) if self.system.startswith("torch-rpc") else self.server.pid
        return (cpu_seconds(server) if server else 0.0,
                sum(cpu_seconds(int(pid)) for pid in self.control[: self.k, PID] if pid),
                cpu_seconds(server, server) if server else 0.0, machine_busy_seconds())

    def failures(self) -> list[str]:
        bad = [f"pusher {i} failed: {self.log_tail(f'pusher{i}', 3)}" for i in range(self.k)
               if self.control[i, STATE] == FAILED][:2]
        if self.server is not None and self.server.poll() is not None:
            bad.append(f"server exited with {self.server.returncode}")
        return bad

    # -- pausing: cooperative (see bench/grad_pusher.py for why not SIGSTOP)
    def pause(self, timeout: float = 30.0) -> None:
        """Raise the pause flag and wait until every pusher holds (or has ended): nothing is in flight."""
        self.control[-1, PAUSE] = 1
        self.paused = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.control[: self.k]
            if ((rows[:, PAUSED] == 1) | (rows[:, STATE] == DONE) | (rows[:, STATE] == FAILED)).all():
                return
            time.sleep(0.005)
        raise TimeoutError(f"{self.system}: pushers did not pause within {timeout:.0f}s")

    def resume(self) -> None:
        self.control[-1, PAUSE] = 0
        self.paused = False

    # -- the end
    def close(self) -> dict:
        """Stop the pushers (stop flag: each ends right after a reply), read the final counts, end everything."""
        final: dict = {}
        try:
            self.control[-1, STOP] = 1
            self.control[-1, PAUSE] = 0
            self.control.flush()
            deadline = time.monotonic() + STOP_TIMEOUT
            # gRPC pushers end right after their next reply; torch-rpc's ranks end together (rpc.shutdown)
            for p in self.procs if self.system.startswith("torch-rpc") else self.pushers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
            final = dict(sent=self.column(SENT), replies=self.column(REPLIES),
                         pushers_done=int((self.control[: self.k, STATE] == DONE).sum()),
                         pusher_errors=self.column(ERROR))
            if self.system.startswith("torch-rpc"):
                final["applied"] = self.applied()
            elif self.server is not None and self.server.poll() is None and self.target:
                with contextlib.suppress(Exception):
                    final["applied"] = self.applied()
            if "applied" in final:  # every pusher ended right after a reply: nothing in flight
                final["counts_add_up"] = final["applied"] == final["sent"] == final["replies"]
        finally:
            if self._channel is not None:
                self._channel.close()
            for p in self.procs:  # the server (and the torch ranks) get SIGTERM first
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            if self.procs:  # anything left in the group, e.g. torch-rpc ranks forked by the launcher
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
        self.final = final
        return final


def _new_control(path: Path, k: int) -> np.memmap:
    control = np.memmap(path, dtype=np.int64, mode="w+", shape=(k + 1, COLUMNS))
    control[:] = 0
    control[-1, PAUSE] = 1  # groups start paused: each pusher holds its first parameters
    control.flush()
    return control


def _wait_ready(group: Group, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = group.control[: group.k, STATE]
        if (states == READY).all():
            return
        if (states == FAILED).any() or group.failures():
            i = int(np.argmax(states == FAILED))
            raise RuntimeError(f"{group.system}: {group.failures()}:\n"
                               f"{group.log_tail('server') or ''}\n{group.log_tail(f'pusher{i}')}")
        for i, p in enumerate(group.pushers):
            if p.poll() is not None and states[i] != READY:
                raise RuntimeError(f"{group.system}: process {i} exited with {p.returncode}:\n"
                                   f"{group.log_tail(f'pusher{i}')}")
        time.sleep(0.05)
    raise TimeoutError(f"{group.system}: {(group.control[: group.k, STATE] == READY).sum()}/{group.k} ready "
                       f"after {timeout:.0f}s")


def split_system(system: str) -> tuple[str, str]:
    """(the system, its wire dtype): `server-bf16` is ps-server with `--wire-dtype bfloat16`, likewise the echo
    and torch-rpc (issue #25); the plain names are float32."""
    return (system[:-5], "bfloat16") if system.endswith("-bf16") else (system, "float32")


def chunk_flags(chunk_mib: float | None) -> list[str]:
    """ps-server's and the echo's --chunk-mib, when the benchmark sets one (else their default)."""
    return [] if chunk_mib is None else ["--chunk-mib", repr(chunk_mib)]


def server_command(size: str, numel: int, k: int, out_dir: Path, model: str | None = None,
                   chunk_mib: float | None = None, wire_dtype: str = "float32",
                   server_args: list[str] | None = None) -> tuple[str, list[str]]:
    """ps-server for K workers, as (module, arguments): a registered model by name (ResNet20 by default), or
    flat-N for 11M/25M (or any size not in SIZES); `server_args` go to ps-server too (bench/sharded.py: --shards S)."""
    common = ["--bind", "127.0.0.1:0", "--workers", str(k), "--dataset", "synthetic", "--algo", "ormo",
              "--iterations", "1000000000", "--out", str(out_dir), "--linger", "0", "--checkpoint-every", "1e9",
              "--wire-dtype", wire_dtype, *chunk_flags(chunk_mib), *(server_args or [])]
    if model or size == "resnet20":
        return "ormo_ps.server.cli", ["--model", model or "resnet20", *common]
    return "bench.ps_server_sized", ["--numel", str(numel), "--", "--model", f"flat-{numel}", *common]


def start_group(system: str, size: str, numel: int, k: int, workdir: Path, *, max_round_trips: int = 10**9,
                max_seconds: float = 900.0, server_env: dict[str, str] | None = None,
                model: str | None = None, chunk_mib: float | None = None,
                server_args: list[str] | None = None) -> Group:
    """Start one system with K pushers (or K torch ranks) and return once every one of them is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    group = Group(system, k, numel, workdir, _new_control(workdir / "control.bin", k))
    base, wire = split_system(system)
    try:
        limits = ["--max-round-trips", str(max_round_trips), "--max-seconds", str(max_seconds)]
        if base == "torch-rpc":  # one launcher forks the server rank and the K worker ranks
            group.server = group.spawn("bench.torch_rpc_ps", ["--world", str(k + 1), "--port", str(free_port()),
                                                              "--numel", str(numel), "--wire-dtype", wire,
                                                              "--control", str(group.control.filename), *limits],
                                       "server")
            _wait_ready(group, START_TIMEOUT)
            return group
        if base == "server":
            group.server = group.spawn(*server_command(size, numel, k, workdir / "run", model, chunk_mib, wire,
                                                       server_args), "server", env=server_env)
            group.target = group.wait_for_address("server", group.server, LISTENING_PATTERN, START_TIMEOUT)
        else:
            group.server = group.spawn("bench.grpc_echo", ["--bind", "127.0.0.1:0", "--numel", str(numel),
                                                           "--wire-dtype", wire, *chunk_flags(chunk_mib)], "server")
            group.target = group.wait_for_address("server", group.server, r"echo listening on ([\d.]+):(\d+)",
                                                  START_TIMEOUT)
        for i in range(k):
            group.spawn("bench.grad_pusher", ["--target", group.target, "--control", str(group.control.filename),
                                              "--slot", str(i), "--slots", str(k), *limits], f"pusher{i}")
        _wait_ready(group, START_TIMEOUT)
        return group
    except BaseException:
        group.close()
        raise


def run_counted(system: str, k: int, round_trips: int, *, size: str = "resnet20", numel: int | None = None,
                workdir: Path, timeout: float = 60.0, model: str | None = None,
                chunk_mib: float | None = None) -> dict:
    """Each of K pushers does exactly `round_trips` round trips; returns the pushers' and the server's counts.

    The benchmark machinery at small scale, for the smoke test: pushers end by count, not by the stop flag.
    """
    numel = numel or SIZES[size]
    group = start_group(system, size, numel, k, workdir, max_round_trips=round_trips, max_seconds=timeout,
                        model=model, chunk_mib=chunk_mib)
    try:
        group.resume()
        deadline = time.monotonic() + timeout
        for p in group.pushers:
            p.wait(max(0.1, deadline - time.monotonic()))
        while (group.control[:k, STATE] != DONE).any() and time.monotonic() < deadline:
            time.sleep(0.02)  # torch-rpc's ranks are not our children
        counts = dict(sent=group.column(SENT), replies=group.column(REPLIES), applied=group.applied(),
                      pushers_done=int((group.control[:k, STATE] == DONE).sum()),
                      numel=int(group.control[0, NUMEL]), up_bytes=int(group.control[0, UP_BYTES]),
                      down_bytes=int(group.control[0, DOWN_BYTES]))
        counts["in_flight"] = counts["sent"] - counts["replies"]
        return counts
    finally:
        group.close()
