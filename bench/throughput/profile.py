"""Profiling the server with py-spy while its pushers push: its top functions by self and total time."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.grad_pusher import REPLIES
from bench.harness import REPO
from bench.throughput.groups import Group
from bench.throughput.plan import GOAL_SIZE


# py-spy's options per mode, and what they mean for the report. Python frames only: `--nonblocking` (the
# process is never paused; C time is charged to the Python line that called it). Native: C/C++ frames too,
# which py-spy can only take by pausing the process for each sample (slower while it runs, so the lower rate).
MODES = {
    "python": (["--nonblocking", "--idle", "--rate", "200"],
               "`record --nonblocking`, 200 Hz, Python frames; time in C is charged to the Python line that called it"),
    "native": (["--native", "--rate", "50"],
               "`record --native`, 50 Hz, C/C++ frames too; py-spy pauses the process for each sample, so it runs "
               "slower meanwhile"),
}


def py_spy_profile(pid: int, seconds: float, out: Path, mode: str) -> dict:
    """Sample a process with py-spy (see MODES) and return its top functions by self and total time."""
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--format", "raw", "--threads", "--output", str(out), *MODES[mode][0]]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except FileNotFoundError:
        return dict(error="py-spy not installed (pip install -e .[bench])")
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


def profile_server(g: Group, settle: float, tmp: Path, log, seconds: float = 5.0,  # noqa: ANN001
                   size: str = GOAL_SIZE) -> dict:
    """py-spy the server while its pushers push: Python frames (never pausing it), then native frames too."""
    result: dict = dict(size=size, k=g.k)
    g.resume()
    try:
        time.sleep(settle)
        for mode in MODES:
            log(f"  profiling the server (pid {g.server.pid}) for {seconds:.0f}s with py-spy ({mode} frames) ...")
            a0, c0, t0 = g.column(REPLIES), g.cpu(), time.perf_counter()
            prof = py_spy_profile(g.server.pid, seconds, tmp / f"server-profile-{mode}.txt", mode)
            a1, c1, t1 = g.column(REPLIES), g.cpu(), time.perf_counter()
            prof.update(seconds=round(t1 - t0, 2), updates_per_s_while_profiled=(a1 - a0) / (t1 - t0),
                        server_cpu_cores=(c1[0] - c0[0]) / (t1 - t0), pushers_cpu_cores=(c1[1] - c0[1]) / (t1 - t0))
            with contextlib.suppress(OSError):
                prof["_collapsed"] = (tmp / f"server-profile-{mode}.txt").read_text()
            result[mode] = prof
    finally:
        g.pause()
    return result
