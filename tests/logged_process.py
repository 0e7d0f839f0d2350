"""A child process whose output is collected line by line (and copied to a log file) for tests to wait on."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path


class LoggedProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name = name
        self.log = log
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("w") as f:
            for line in self.proc.stdout:
                self.lines.append(line)
                f.write(line)
                f.flush()

    def output(self) -> str:
        self._reader.join(5)
        return "".join(self.lines)

    def find_all(self, pattern: str) -> list[re.Match]:
        return [m for line in list(self.lines) if (m := re.search(pattern, line))]

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> re.Match:
        """The `count`-th line matching `pattern`; fails with the output when it does not come in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find_all(pattern)
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} x{count} (exit {self.proc.poll()}):\n"
                             f"{self.output()[-3000:]}")
