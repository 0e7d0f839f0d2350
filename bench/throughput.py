"""Throughput of the real ps-server against the transport's ceiling and a torch.distributed.rpc server.

Three systems, driven side by side in one run, for each model size and number of workers K:

- `server`: the real `ps-server` (OrMo) in a subprocess, `python -m server.cli ...` (ResNet20 on the
  synthetic data set), or bench/ps_server_sized.py (the same CLI with a flat model of 11.2M / 25.6M
  parameters registered, since the model registry has none that large), with K synthetic gradient
  pushers (bench/grad_pusher.py: separate processes, raw Train streams, no model compute);
- `echo`: bench/grpc_echo.py, a grpc.aio bidi server with the same service, options, messages and Train
  serializers (common/wire.py) and no server logic, driven by the same pushers: the round trips gRPC
  allows on this machine;
- `torch-rpc`: bench/torch_rpc_ps.py, a parameter server on torch.distributed.rpc (TensorPipe over
  loopback TCP) as PyTorch's tutorials build one, with K worker ranks pushing the same gradients.

All three groups of processes are started first and paused (a flag in their control file: each pusher
finishes its round trip and holds); then measurement windows alternate between them (resume, settle,
count, pause), rotating the order every repetition, and the medians are compared. Counts come from the
servers (updates applied, read with GetStatus or from the torch server's counter) and from the pushers
(round trips, through a shared control file). Everything listens on 127.0.0.1; every process is killed
in a finally block.

    python bench/throughput.py            # full run, ~8 min: writes bench/results/throughput.{md,json}
    python bench/throughput.py --quick    # ~1 min: ResNet20, K=16, to runs/bench/throughput_quick.*
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from grad_pusher import (  # noqa: E402
    APPLIED, COLUMNS, DONE, DOWN_BYTES, ERROR, FAILED, NUMEL, PAUSE, PAUSED, PID, READY, REPLIES, REPLY_NS_A,
    REPLY_NS_B, SENT, SERVER_PID, STATE, STOP, UP_BYTES,
)

RESULTS = BENCH / "results"
SYSTEMS = ("server", "echo", "torch-rpc")
RESNET20_NUMEL = 269_722  # ResNet20 with 10 classes (checked against the registry at start-up)
SIZES = {
    "resnet20": RESNET20_NUMEL,
    "11M": 11_173_962,  # ResNet-18 for CIFAR-10
    "25M": 25_557_032,  # ResNet-50 for ImageNet
}
SIZE_NOTES = {
    "resnet20": "ResNet20 (`--model resnet20 --dataset synthetic`, 3x8x8 inputs, 10 classes)",
    "11M": "flat-11173962: a flat vector the size of ResNet-18 for CIFAR-10 (bench/ps_server_sized.py)",
    "25M": "flat-25557032: a flat vector the size of ResNet-50 for ImageNet (bench/ps_server_sized.py)",
}
# (K values, windows per system, minimum window seconds) per size. The large sizes get fewer K and two
# windows each: a 45-100 MB round trip takes 0.5-2 s through gRPC here and a window must see a reply from
# every pusher (25M with K=4 alone took two minutes), 16 pushers hold ~3 GB per system, and the whole
# run keeps to ~8 minutes on 2 cores.
FULL_PLAN = {"resnet20": ((1, 4, 16, 64), 3, 2.0), "11M": ((1, 4), 2, 4.0), "25M": ((1,), 2, 4.0)}
QUICK_PLAN = {"resnet20": ((16,), 2, 1.5)}
GOAL_ECHO_FRACTION = 0.9
GOAL_K, GOAL_SIZE = 16, "resnet20"
START_TIMEOUT = 120.0  # seconds for a group to get every process ready (K=64 torch ranks on 2 cores: ~70 s)
STOP_TIMEOUT = 20.0

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child before exec: SIGKILL it if the benchmark dies
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_state() -> dict:
    """The commit measured and whether the server's code differs from it (other people edit the tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return dict(head=git("rev-parse", "--short", "HEAD"),
                server_code_modified=git("status", "--porcelain", "--", "server", "common").splitlines())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def estimated_bytes(system: str, numel: int, k: int) -> int:
    """Rough peak memory of a group: a few message-sized copies per process plus the interpreter."""
    msg = 4 * numel
    if system == "torch-rpc":  # forked ranks share torch's pages
        return (k + 1) * (3 * msg + (60 << 20)) + (300 << 20)
    return k * (4 * msg + (60 << 20)) + 8 * msg + (400 << 20)


# ------------------------------------------------------------------------------------------------- groups


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

    def spawn(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "wb")
        err = open(self.workdir / f"{name}.err", "wb")
        try:
            p = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **env} if env else None,
                                 process_group=self.procs[0].pid if self.procs else 0,
                                 preexec_fn=_die_with_parent)
        finally:
            out.close()
            err.close()
        self.procs.append(p)
        return p

    def log_tail(self, name: str, lines: int = 15) -> str:
        text = ""
        for suffix in ("err", "out"):
            with contextlib.suppress(OSError):
                text += (self.workdir / f"{name}.{suffix}").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- counters
    def applied(self) -> int:
        """Updates applied (gradients echoed) by the server so far."""
        if self.system == "torch-rpc":
            return int(self.control[-1, APPLIED])
        import grpc

        from common.pb import parameter_server_pb2 as pb
        from common.pb import parameter_server_pb2_grpc as pb_grpc

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

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of (the server process, all the pushers); the processes write their pids themselves."""
        server = int(self.control[-1, SERVER_PID]) if self.system == "torch-rpc" else self.server.pid
        return (cpu_seconds(server) if server else 0.0,
                sum(cpu_seconds(int(pid)) for pid in self.control[: self.k, PID] if pid))

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
            for p in self.procs if self.system == "torch-rpc" else self.pushers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
            final = dict(sent=self.column(SENT), replies=self.column(REPLIES),
                         pushers_done=int((self.control[: self.k, STATE] == DONE).sum()),
                         pusher_errors=self.column(ERROR))
            if self.system == "torch-rpc":
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


def _wait_for_line(group: Group, name: str, proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    path = group.workdir / f"{name}.out"
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{group.log_tail(name)}")
        time.sleep(0.05)
    raise TimeoutError(f"{name} printed no {pattern!r} within {timeout:.0f}s:\n{group.log_tail(name)}")


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


def server_command(size: str, numel: int, k: int, out_dir: Path, model: str | None = None) -> list[str]:
    """ps-server for K workers: a registered model by name (ResNet20 by default), or flat-N for 11M/25M."""
    common = ["--bind", "127.0.0.1:0", "--workers", str(k), "--dataset", "synthetic", "--algo", "ormo",
              "--iterations", "1000000000", "--out", str(out_dir), "--linger", "0", "--checkpoint-every", "1e9"]
    if model or size == "resnet20":
        return [sys.executable, "-m", "server.cli", "--model", model or "resnet20", *common]
    return [sys.executable, str(BENCH / "ps_server_sized.py"), "--numel", str(numel), "--",
            "--model", f"flat-{numel}", *common]


def start_group(system: str, size: str, numel: int, k: int, workdir: Path, *, max_round_trips: int = 10**9,
                max_seconds: float = 900.0, server_env: dict[str, str] | None = None,
                model: str | None = None) -> Group:
    """Start one system with K pushers (or K torch ranks) and return once every one of them is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    group = Group(system, k, numel, workdir, _new_control(workdir / "control.bin", k))
    try:
        limits = ["--max-round-trips", str(max_round_trips), "--max-seconds", str(max_seconds)]
        if system == "torch-rpc":  # one launcher forks the server rank and the K worker ranks
            group.server = group.spawn([sys.executable, str(BENCH / "torch_rpc_ps.py"), "--world", str(k + 1),
                                        "--port", str(free_port()), "--numel", str(numel),
                                        "--control", str(group.control.filename), *limits], "server")
            _wait_ready(group, START_TIMEOUT)
            return group
        if system == "server":
            group.server = group.spawn(server_command(size, numel, k, workdir / "run", model), "server",
                                       env=server_env)
            m = _wait_for_line(group, "server", group.server, r"ps-server listening on ([\d.]+:\d+)", START_TIMEOUT)
        else:
            group.server = group.spawn([sys.executable, str(BENCH / "grpc_echo.py"), "--bind", "127.0.0.1:0",
                                        "--numel", str(numel)], "server")
            m = _wait_for_line(group, "server", group.server, r"echo listening on ([\d.]+:\d+)", START_TIMEOUT)
        group.target = m.group(1)
        for i in range(k):
            group.spawn([sys.executable, str(BENCH / "grad_pusher.py"), "--target", group.target,
                         "--control", str(group.control.filename), "--slot", str(i), "--slots", str(k), *limits],
                        f"pusher{i}")
        _wait_ready(group, START_TIMEOUT)
        return group
    except BaseException:
        group.close()
        raise


def run_counted(system: str, k: int, round_trips: int, *, size: str = "resnet20", numel: int | None = None,
                workdir: Path, timeout: float = 60.0, model: str | None = None) -> dict:
    """Each of K pushers does exactly `round_trips` round trips; returns the pushers' and the server's counts.

    The benchmark machinery at small scale, for the smoke test: pushers end by count, not by the stop flag.
    """
    numel = numel or SIZES[size]
    group = start_group(system, size, numel, k, workdir, max_round_trips=round_trips, max_seconds=timeout,
                        model=model)
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


# ------------------------------------------------------------------------------------------- measurement


def _wait(group: Group, until, at_least: float, at_most: float) -> None:  # noqa: ANN001
    """Sleep at least `at_least` seconds, then until `until()` holds or `at_most` seconds passed."""
    start = time.monotonic()
    time.sleep(at_least)
    while not until() and time.monotonic() - start < at_most:
        if group.failures():
            raise RuntimeError(f"{group.system}: {group.failures()}")
        time.sleep(0.005)
    if group.failures():
        raise RuntimeError(f"{group.system}: {group.failures()}")


def measure_window(group: Group, settle: float, window: float, window_max: float) -> dict:
    """One window: resume, settle, count replies, pause. Rates are per pusher, from the replies' own times.

    Settle: at least `settle` seconds and until every pusher had a reply since it resumed (so the window
    starts from a reply, not from the pause). Window: at least `window` seconds and until every pusher
    had a reply in it (at most `window_max`). A pusher's rate is its replies in the window over the time
    from its last reply before the window to its last reply in it: exact for a closed loop, with no
    rounding to whole round trips per window (which matters at 1-3 round trips per second). The sum
    over pushers is the system's rate; if some pusher had no reply in `window_max`, the window falls
    back to (replies in the window) / (window length).
    """
    k = group.k
    group.resume()
    try:
        n_resumed, _ = group.snapshot()
        _wait(group, lambda: (group.snapshot()[0] > n_resumed).all(), settle, window_max)
        n0, ns0 = group.snapshot()
        c0, t0 = group.cpu(), time.perf_counter()
        _wait(group, lambda: (group.snapshot()[0] > n0).all(), window, window_max)
        n1, ns1 = group.snapshot()
        c1, t1 = group.cpu(), time.perf_counter()
    finally:
        group.pause()
    dt = t1 - t0
    dn = n1 - n0
    if (dn >= 1).all():
        rate, estimator = float(sum(dn[i] / ((ns1[i] - ns0[i]) / 1e9) for i in range(k))), "per-pusher reply times"
    else:
        rate, estimator = float(dn.sum() / dt), "count over the window"
    return dict(seconds=dt, round_trips=int(dn.sum()), round_trips_per_s=rate, estimator=estimator,
                server_cpu_cores=(c1[0] - c0[0]) / dt, pushers_cpu_cores=(c1[1] - c0[1]) / dt)


def py_spy_profile(pid: int, seconds: float, out: Path, native: bool) -> dict:
    """Sample a process with py-spy and return its top functions by self and total time.

    Python frames only: `--nonblocking` (the process is never paused; C time is charged to the Python
    line that called it). Native: C/C++ frames too, which py-spy can only take by pausing the process for
    each sample (slower while it runs, so the lower rate).
    """
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--format", "raw", "--threads", "--output", str(out)]
    cmd += ["--native", "--rate", "50"] if native else ["--nonblocking", "--idle", "--rate", "200"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except FileNotFoundError:
        return dict(error="py-spy not installed (pip install py-spy)")
    except subprocess.TimeoutExpired:
        return dict(error="py-spy did not finish in time")
    if res.returncode != 0 or not out.exists():
        return dict(error=f"py-spy failed ({res.returncode}): {res.stderr[-500:]}")
    return summarize_collapsed(out.read_text())


def _frame_name(frame: str) -> str:
    # "function (file.py:123)" -> "function (file.py)"; native frames have no line
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarize_collapsed(text: str, top: int = 15) -> dict:
    self_t: dict[str, int] = defaultdict(int)
    total_t: dict[str, int] = defaultdict(int)
    files: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        samples += n
        threads[frames[0]] += n
        for f in set(frames[1:]):
            total_t[f] += n
        for f in {m.group(1) for m in (re.search(r"\((.+?)\)$", f) for f in frames[1:]) if m}:
            files[_short_path(f)] += n
        self_t[frames[-1]] += n

    def pct(d: dict[str, int]) -> list[list]:
        return [[name, round(100 * v / samples, 1)] for name, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return dict(samples=samples, threads=pct(threads), self=pct(self_t), total=pct(total_t), files=pct(files))


def _short_path(path: str) -> str:
    """Files of this repository relative to it; installed packages from their package directory on."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO))
    m = re.search(r"(?:site-packages|lib/python3\.\d+)/(.+)$", path)
    return m.group(1) if m else path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _rotated(order: list[str], rep: int) -> list[str]:
    if not order:
        return []
    r = rep % len(order)
    return order[r:] + order[:r]


def summarize_k(k: int, systems: tuple[str, ...], groups: dict[str, Group], windows: dict[str, list[dict]],
                skipped: dict[str, str]) -> dict:
    row: dict = dict(k=k, systems={})
    for system in systems:
        ws = windows.get(system, [])
        if not ws:
            row["systems"][system] = dict(skipped=skipped.get(system, "not measured"))
            continue
        g = groups[system]
        up, down = int(g.control[0, UP_BYTES]), int(g.control[0, DOWN_BYTES])
        rts = median([w["round_trips_per_s"] for w in ws])
        # Every reply of ps-server and torch-rpc follows exactly one applied update (asynchronous rules: the
        # worker's own gradient is applied, then it gets the parameters), so replies/s = updates/s; the
        # servers' own counters are checked against the pushers' at the end (final_counts).
        row["systems"][system] = dict(
            updates_per_s=rts, round_trips_per_s=rts,
            up_bytes_per_msg=up, down_bytes_per_msg=down, up_mb_per_s=rts * up / 1e6, down_mb_per_s=rts * down / 1e6,
            server_cpu_cores=median([w["server_cpu_cores"] for w in ws]),
            pushers_cpu_cores=median([w["pushers_cpu_cores"] for w in ws]), windows=ws)
        if system in skipped:
            row["systems"][system]["note"] = skipped[system]
    s = row["systems"]
    if "updates_per_s" in s.get("server", {}):
        if "round_trips_per_s" in s.get("echo", {}):
            row["server_over_echo"] = s["server"]["updates_per_s"] / s["echo"]["round_trips_per_s"]
        if "updates_per_s" in s.get("torch-rpc", {}):
            row["server_over_torch_rpc"] = s["server"]["updates_per_s"] / s["torch-rpc"]["updates_per_s"]
    return row


def measure_k(size: str, numel: int, k: int, reps: int, window: float, settle: float, systems: tuple[str, ...],
              tmp: Path, profile: str, log, server_env: dict[str, str] | None = None  # noqa: ANN001
              ) -> tuple[dict, dict | None]:
    groups: dict[str, Group] = {}
    skipped: dict[str, str] = {}
    windows: dict[str, list[dict]] = defaultdict(list)
    profile_result = None
    finals: dict[str, dict] = {}
    t_start = time.monotonic()
    try:
        for system in systems:
            need, have = estimated_bytes(system, numel, k), mem_available()
            if need > 0.6 * have:
                skipped[system] = f"not run: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
                log(f"  {size} K={k} {system}: {skipped[system]}")
                continue
            t = time.monotonic()
            try:
                groups[system] = start_group(system, size, numel, k, tmp / f"{size}-k{k}-{system}",
                                             server_env=server_env)
            except Exception as e:  # noqa: BLE001 - recorded in the results; the other systems still run
                skipped[system] = f"failed to start: {type(e).__name__}: {str(e)[-600:]}"
                log(f"  {size} K={k} {system}: {skipped[system]}")
                continue
            groups[system].pause()
            log(f"  {size} K={k} {system}: {k} pushers ready in {time.monotonic() - t:.1f}s")
        order = list(groups)
        for rep in range(reps):
            for system in _rotated(order, rep):
                if system in skipped:
                    continue
                try:
                    w = measure_window(groups[system], settle, window, max(10.0, 3 * window))
                except Exception as e:  # noqa: BLE001
                    skipped[system] = f"failed while measuring: {type(e).__name__}: {str(e)[-600:]}"
                    log(f"  {size} K={k} {system}: {skipped[system]}")
                    continue
                windows[system].append(dict(rep=rep, **w))
        row = summarize_k(k, systems, groups, windows, skipped)
        missed = (row.get("server_over_echo", 1.0) < GOAL_ECHO_FRACTION
                  or row.get("server_over_torch_rpc", 2.0) <= 1.0)
        at_goal = size == GOAL_SIZE and k == GOAL_K
        if "server" in groups and "server" not in skipped and (
                profile == "always" and at_goal or profile == "auto" and at_goal and missed):
            profile_result = profile_server(groups["server"], settle, tmp, log)
    finally:
        for system, g in groups.items():
            try:
                finals[system] = g.close()
            except Exception as e:  # noqa: BLE001
                finals[system] = dict(error=f"{type(e).__name__}: {e}")
    for system, final in finals.items():
        row["systems"][system]["final_counts"] = final
    row["seconds"] = round(time.monotonic() - t_start, 1)
    log(f"  {size} K={k}: " + "; ".join(
        f"{name} {v['updates_per_s']:.1f}/s" if "updates_per_s" in v else f"{name} -"
        for name, v in row["systems"].items())
        + (f"; server/echo {row['server_over_echo']:.2f}" if "server_over_echo" in row else "")
        + (f"; server/torch-rpc {row['server_over_torch_rpc']:.2f}" if "server_over_torch_rpc" in row else "")
        + f" ({row['seconds']}s)")
    return row, profile_result


def profile_server(g: Group, settle: float, tmp: Path, log, seconds: float = 5.0) -> dict:  # noqa: ANN001
    """py-spy the server while its pushers push: Python frames (never pausing it), then native frames too."""
    result: dict = dict(size=GOAL_SIZE, k=g.k)
    g.resume()
    try:
        time.sleep(settle)
        for mode in ("python", "native"):
            log(f"  profiling the server (pid {g.server.pid}) for {seconds:.0f}s with py-spy ({mode} frames) ...")
            a0, c0, t0 = g.column(REPLIES), g.cpu(), time.perf_counter()
            prof = py_spy_profile(g.server.pid, seconds, tmp / f"server-profile-{mode}.txt", native=mode == "native")
            a1, c1, t1 = g.column(REPLIES), g.cpu(), time.perf_counter()
            prof.update(seconds=round(t1 - t0, 2), updates_per_s_while_profiled=(a1 - a0) / (t1 - t0),
                        server_cpu_cores=(c1[0] - c0[0]) / (t1 - t0), pushers_cpu_cores=(c1[1] - c0[1]) / (t1 - t0))
            with contextlib.suppress(OSError):
                prof["_collapsed"] = (tmp / f"server-profile-{mode}.txt").read_text()
            result[mode] = prof
    finally:
        g.pause()
    return result


# ------------------------------------------------------------------------------------------------ report


def goals(sizes: list[dict]) -> list[dict]:
    out = []
    rows = {(s["size"], r["k"]): r for s in sizes for r in s["rows"]}
    goal = rows.get((GOAL_SIZE, GOAL_K))
    ratio = goal.get("server_over_echo") if goal else None
    out.append(dict(goal=f"at K={GOAL_K} with ResNet20 the server applies at least {GOAL_ECHO_FRACTION:.0%} of the "
                         "echo ceiling's round trips",
                    value=ratio, verdict="not measured" if ratio is None else
                    ("met" if ratio >= GOAL_ECHO_FRACTION else "missed")))
    ratio = goal.get("server_over_torch_rpc") if goal else None
    everywhere = [r["server_over_torch_rpc"] for r in rows.values() if "server_over_torch_rpc" in r]
    out.append(dict(goal=f"it beats the PyTorch RPC server (at K={GOAL_K} with ResNet20)", value=ratio,
                    verdict="not measured" if ratio is None else ("met" if ratio > 1.0 else "missed"),
                    elsewhere=f"server faster at {sum(x > 1 for x in everywhere)} of {len(everywhere)} "
                              "(size, K) points measured"))
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Throughput: ps-server vs the gRPC echo ceiling vs a torch.distributed.rpc parameter server", "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; took {meta['seconds']:.0f} s.  ",
        f"Machine: {meta['machine']['platform']}, {meta['machine']['processor']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gib']} GiB, shared with other jobs at times: load average (1, 5, 15 min) "
        f"{meta['load_average_begin']} at the start, {meta['load_average_end']} at the end.  ",
        f"Code: commit {meta['git_begin']['head']}"
        + (f" (server/common modified in the working tree: {', '.join(meta['git_begin']['server_code_modified'])})"
           if meta["git_begin"]["server_code_modified"] else "")
        + ("" if meta["git_begin"] == meta["git_end"] else
           f"; CHANGED during the run, to {meta['git_end']['head']} {meta['git_end']['server_code_modified']}")
        + ".  ",
        f"Python {meta['python']}; torch {meta['torch']}; grpcio {meta['grpc']}; numpy {meta['numpy']}."
        + (f"  \nps-server environment: {', '.join(f'{k}={v}' for k, v in meta['server_env'].items())}."
           if meta.get("server_env") else ""), "",
        "How: K synthetic pushers (separate processes, raw Train streams, no model compute: receive Parameters, "
        "send at once a float32 gradient of the right size with the received iteration index) drive the real "
        "`ps-server` (OrMo, every check and update it does in training: decode, NaN/Inf check, the update, "
        "encode, metrics) and, with the same pushers and messages, `bench/grpc_echo.py`, a grpc.aio bidi server "
        "that answers each gradient with its own tensor (through ps-server's Train serializers) and does nothing else "
        "(the transport's ceiling). "
        "`bench/torch_rpc_ps.py` is the same job on `torch.distributed.rpc` as PyTorch's tutorials build it "
        "(rank 0 holds the parameters, K worker ranks `rpc_sync` an update-and-fetch that applies "
        "`torch.optim.SGD(momentum=0.9)` under a lock and returns the parameters; TensorPipe over loopback TCP). "
        "All three are started and paused (a flag: each pusher finishes its round trip and holds its parameters), "
        f"then measured in alternating windows ({meta['window_s']}; after {meta['settle_s']} s to settle; "
        "order rotated each repetition); medians of the windows. "
        "Rates are round trips per second counted at the pushers, each pusher's replies in the window over the "
        "time between its replies (no rounding to whole round trips at 1-3 per second), summed over pushers; "
        "a window lasts at least the stated seconds and until every pusher had a reply in it. For ps-server and "
        "torch-rpc every reply follows exactly one applied update, so this is updates/s; at the end of each "
        "configuration the servers' own counters (GetStatus `gradients_applied`, the torch server's counter) "
        "are checked against the pushers' sent and received counts (JSON `final_counts.counts_add_up`). "
        "MB/s = round trips/s x message bytes (the gRPC messages' serialized sizes; the tensor payload for "
        "torch-rpc), each direction. CPU columns: cores used by the server process and by all pushers "
        "together during the windows (2 cores in all).", "",
        "The per-algorithm cost of one update against memory bandwidth is measured separately by "
        "`bench/update_cost.py` ([update_cost.md](update_cost.md)).", "",
    ]
    for size in result["sizes"]:
        lines += [f"## {size['size']}: {size['numel']:,} parameters ({size['numel'] * 4 / 1e6:.1f} MB per tensor)", "",
                  f"{size['note']}. K = {', '.join(map(str, size['ks']))}; windows of at least {size['window_s']} s, "
                  f"{size['reps']} per system.", "",
                  "| K | server updates/s | echo round trips/s | torch-rpc updates/s | server / echo | "
                  "server / torch-rpc | server MB/s up / down | echo MB/s up / down | torch-rpc MB/s up / down | "
                  "CPU cores, server process + pushers: server / echo / torch-rpc |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in size["rows"]:
            s = r["systems"]

            def rate(name: str, key: str) -> str:
                v = s.get(name, {})
                return _fmt(v.get(key)) if key in v else "not run"

            def mbs(name: str) -> str:
                v = s.get(name, {})
                return f"{v['up_mb_per_s']:.0f} / {v['down_mb_per_s']:.0f}" if "up_mb_per_s" in v else "-"

            def cpu(name: str) -> str:
                v = s.get(name, {})
                return f"{v['server_cpu_cores']:.2f}+{v['pushers_cpu_cores']:.2f}" if "server_cpu_cores" in v else "-"

            lines.append(f"| {r['k']} | {rate('server', 'updates_per_s')} | {rate('echo', 'round_trips_per_s')} | "
                         f"{rate('torch-rpc', 'updates_per_s')} | {_fmt(r.get('server_over_echo'), '.2f')} | "
                         f"{_fmt(r.get('server_over_torch_rpc'), '.2f')} | {mbs('server')} | {mbs('echo')} | "
                         f"{mbs('torch-rpc')} | {cpu('server')} / {cpu('echo')} / {cpu('torch-rpc')} |")
        notes = [f"K={r['k']} {name}: {v.get('skipped') or v.get('note')}" for r in size["rows"]
                 for name, v in r["systems"].items() if v.get("skipped") or v.get("note")]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    lines += ["## Goals", ""]
    for g in result["goals"]:
        lines.append(f"- **{g['verdict'].upper()}**: {g['goal']}: ratio {_fmt(g['value'], '.2f')}"
                     + (f" ({g['elsewhere']})" if g.get("elsewhere") else "") + ".")
    prof = result.get("profile")
    if prof:
        lines += ["", f"## Profile of the server at {prof['size']} K={prof['k']}", ""]
        if result.get("profile_findings"):
            lines += [result["profile_findings"], ""]
        for mode, how in (("python", "`record --nonblocking`, 200 Hz, Python frames; time in C is charged to the "
                                     "Python line that called it"),
                          ("native", "`record --native`, 50 Hz, C/C++ frames too; py-spy pauses the process for "
                                     "each sample, so it runs slower meanwhile")):
            p = prof.get(mode)
            if not p:
                continue
            if "error" in p:
                lines += [f"{mode}: not profiled: {p['error']}", ""]
                continue
            lines += [f"**{mode.capitalize()} frames** (py-spy {how}; {p['seconds']} s, {p['samples']} samples over "
                      f"all threads, {p['updates_per_s_while_profiled']:.0f} updates/s meanwhile, server process "
                      f"{p['server_cpu_cores']:.2f} cores, pushers {p['pushers_cpu_cores']:.2f} cores; % of all "
                      f"samples; stacks in [{p.get('collapsed_stacks')}]({p.get('collapsed_stacks')})). "
                      "Samples by thread: " + ", ".join(f"{n} {v}%" for n, v in p["threads"]) + ".", "",
                      "| top functions by self time | % | top functions by total time | % |", "|---|---|---|---|"]
            for a, b in zip(p["self"], p["total"]):
                lines.append(f"| `{a[0]}` | {a[1]} | `{b[0]}` | {b[1]} |")
            lines += ["", "Files by total time: " + ", ".join(f"`{n}` {v}%" for n, v in p["files"]) + ".", ""]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet20 only, K=4 and 16, shorter windows (~1 min)")
    p.add_argument("--sizes", default=None, help=f"comma-separated subset of {', '.join(SIZES)}")
    p.add_argument("--ks", default=None, help="comma-separated K values for every size (default: per size)")
    p.add_argument("--reps", type=int, default=None, help="windows per system (default: per size)")
    p.add_argument("--window", type=float, default=None, help="seconds per window (default: per size)")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds after resuming before a window (and until every pusher had a reply)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--profile", choices=("auto", "always", "never"), default=None,
                   help=f"py-spy the server at {GOAL_SIZE} K={GOAL_K}: when a goal is missed (auto, the default), "
                        "always, never (the default with --quick)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the ps-server process only (diagnostics, e.g. OMP_NUM_THREADS=1)")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (default: bench/results/throughput, "
                        "runs/bench/throughput_quick with --quick)")
    args = p.parse_args(argv)
    plan = dict(QUICK_PLAN if args.quick else FULL_PLAN)
    if args.sizes:
        wanted = args.sizes.split(",")
        unknown = [s for s in wanted if s not in SIZES]
        if unknown:
            p.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
        plan = {s: plan.get(s, FULL_PLAN[s]) for s in wanted}
    systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    args.profile = args.profile or ("never" if args.quick else "auto")
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    out = args.out or (REPO / "runs" / "bench" / "throughput_quick" if args.quick else RESULTS / "throughput")
    t_begin = time.monotonic()
    load_begin = os.getloadavg()
    git_begin = git_state()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", file=sys.stderr, flush=True)

    import grpc
    import torch

    from common.models import build_model, count_parameters

    assert count_parameters(build_model("resnet20", 10, (3, 8, 8))) == RESNET20_NUMEL
    notes = []
    try:
        import torch.distributed.rpc as rpc

        rpc_ok = rpc.is_available()
    except ImportError:
        rpc_ok = False
    if "torch-rpc" in systems and not rpc_ok:
        systems = tuple(s for s in systems if s != "torch-rpc")
        notes.append("torch.distributed.rpc is not available in this torch build: the torch-rpc baseline was skipped.")
    sizes = []
    profile_result = None
    with tempfile.TemporaryDirectory(prefix="ps-throughput-") as tmp:
        for size, (ks, reps, window) in plan.items():
            ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else ks
            reps, window = args.reps or reps, args.window or window
            log(f"{size} ({SIZES[size]:,} parameters): K={ks}, {reps} windows of {window}s per system")
            rows = []
            for k in ks:
                row, prof = measure_k(size, SIZES[size], k, reps, window, args.settle, systems, Path(tmp), args.profile,
                                      log, server_env)
                rows.append(row)
                profile_result = prof or profile_result
            sizes.append(dict(size=size, numel=SIZES[size], note=SIZE_NOTES[size], ks=list(ks), reps=reps,
                              window_s=window, rows=rows))
    import multiprocessing

    meta = dict(
        command="python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=_cpu_name(), cores=multiprocessing.cpu_count(),
                     memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)),
        python=platform.python_version(), torch=torch.__version__, grpc=grpc.__version__, numpy=np.__version__,
        git_begin=git_begin, git_end=git_state(),
        load_average_begin=[round(x, 2) for x in load_begin],
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        systems=list(systems), server_env=server_env, reps=args.reps or "per size",
        window_s=f"{args.window} s" if args.window else "the size's seconds", settle_s=args.settle,
        seconds=time.monotonic() - t_begin)
    notes += [
        "Sizes 11M and 25M: the model registry has no model that large (its largest, resnet110, has 1.7M "
        "parameters), so the server runs from bench/ps_server_sized.py: the unchanged ps-server CLI with a model "
        "`flat-N` (one trainable vector of N parameters) added to the registry in that process only.",
        "The large sizes use fewer K and shorter runs (11M: K=1, 4; 25M: K=1; 2 windows each) to keep the run "
        "within ~8 minutes on 2 cores: a 45-100 MB round trip takes 0.5-2 s through gRPC here and a window must "
        "see a reply from every pusher (25M with K=4 alone took two minutes in a trial run); every pusher also "
        "holds a few copies of the message with 3 groups alive at once. A system whose estimated memory exceeds "
        "60% of what is available is not run and says so in its row.",
        "torch-rpc crosses loopback TCP (TensorPipe `uv` transport, `basic` channel), as it would between "
        "machines; TensorPipe's shared-memory transport and CMA channel are faster on one host but do not "
        "apply to a parameter server on another machine.",
        "On 2 cores the pushers compete with the server for CPU: every number here is for the server and K "
        "pushers sharing those 2 cores, the same for all three systems.",
        "Every process of all three systems (servers, ranks, pushers) runs with the same glibc malloc settings "
        "(common/malloc_tuning.py, as ps-server and ps-worker do): with glibc's defaults each megabyte message "
        "paid fresh page faults for each of its buffers. ps-server uses one torch thread (its `--threads` "
        "default); the echo shares ps-server's hand-framed Train serializers (common/wire.py), so it stays the "
        "cheapest way to move these messages through grpc.aio, not a slower protobuf path.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode, prof in (profile_result or {}).items():
        if isinstance(prof, dict) and "_collapsed" in prof:
            stacks = out.with_name(f"{out.name}_server_profile_{mode}.txt")
            stacks.write_text(prof.pop("_collapsed"))
            prof["collapsed_stacks"] = stacks.name
    result = dict(meta=meta, sizes=sizes, goals=goals(sizes), profile=profile_result, notes=notes)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out.with_suffix('.md')} and .json")
    for g in result["goals"]:
        log(f"goal {g['verdict']}: {g['goal']} (ratio {_fmt(g['value'], '.2f')})")
    return result


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
