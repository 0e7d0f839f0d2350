"""Helper processes of the benchmarks: `python -m MODULE` in the repository root, output to log files.

Servers, workers and the throughput benchmark's pushers are all started this way (`python -m ormo_ps.server.cli`,
`python -m bench.grad_pusher`, ...), and a benchmark waits for the line a server prints once it listens.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO


def start(module: str, args: list[str], *, log: Path, err: Path | None = None, **popen: Any) -> subprocess.Popen:
    """Start `python -m MODULE ARGS` in the repository root; stdout goes to `log` (appended), stderr to `err`
    (default: `log` too). Other keyword arguments go to Popen (env, process_group, ...)."""
    with open(log, "ab") as out, (open(err, "ab") if err else contextlib.nullcontext(subprocess.STDOUT)) as errors:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=errors, **popen)


def tail(*logs: Path, lines: int = 15) -> str:
    """The last lines of the logs, one after the other (missing files are empty)."""
    text = ""
    for log in logs:
        with contextlib.suppress(OSError):
            text += log.read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout: float, *, offset: int = 0,
                  show: tuple[Path, ...] = ()) -> re.Match:
    """Wait until `log` (from byte `offset` on) matches `pattern`, e.g. a server's "listening on HOST:PORT".

    Fails at once if `proc` exits first, and after `timeout` seconds; the error shows the end of `show`
    (default: the log).
    """
    deadline = time.monotonic() + timeout
    while True:
        text = ""
        with contextlib.suppress(OSError):
            text = log.read_bytes()[offset:].decode(errors="replace")
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {proc.returncode}:\n{tail(*(show or (log,)))}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.stem} printed no {pattern!r} within {timeout:.0f}s:\n{tail(*(show or (log,)))}")
        time.sleep(0.05)
