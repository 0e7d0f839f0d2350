"""ps-server on a disk that the test can fill: a small tmpfs in a mount namespace of the server's own.

`sh` mounts the tmpfs, runs the server, and then keeps the namespace (and so the disk) alive, so that its
files can still be read through /proc/PID/root after the server exited. Needs `unshare -m` (root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.processes import wait_for_line
from ormo_ps.server.serving import LISTENING_PATTERN


def unavailable() -> str | None:
    """Why no small disk can be made here, or None."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        return "needs `unshare -m` (root) to give the server a small tmpfs of its own"
    return None


class ServerOnSmallDisk:
    def __init__(self, out: Path, log: Path, server_args: list[str], *, cwd: Path, env: dict[str, str],
                 size: str = "4m") -> None:
        self.log = log
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o size={size} tmpfs "{out}" && "$0" "$@"; echo "exit=$?"; exec sleep 120',
             sys.executable, "-m", "ormo_ps.server.cli", *server_args, "--out", str(out)],
            cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
        self.disk = Path(f"/proc/{self.holder.pid}/root") / str(out).lstrip("/")  # the tmpfs, seen from here

    def port(self, timeout: float = 60) -> int:
        return int(wait_for_line(self.log, LISTENING_PATTERN, self.holder, timeout).group(2))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def fill(self) -> None:
        """Write to the disk until it is full."""
        with open(self.disk / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass

    def sigterm(self, timeout: float = 60) -> int:
        """SIGTERM the server and return its exit code (the namespace stays for a look at the disk)."""
        server_pid = int(Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()[0])
        os.kill(server_pid, signal.SIGTERM)
        self.wait_for("exit=", timeout)
        return int(self.log.read_text().split("exit=")[1].split()[0])

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)
