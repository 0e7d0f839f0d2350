"""`ps-server --shards S`: S shard processes (`ps-shard`) on this machine, started and stopped by ps-server.

Each listens on --bind's host, on the ports after --bind's (or free ports when --bind's is 0), ends with
ps-server (its death signal: common/parent.py) and is told the run by ps-server once it listens. Workers are
told `:PORT` (the host they reached ps-server at).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ormo_ps.common.parent import PARENT_VARIABLE

logger = logging.getLogger(__name__)

LISTENING = re.compile(r"ps-shard listening on (\S+):(\d+)")


@dataclass
class LocalShards:
    """The shard processes of one ps-server: their addresses (for the coordinator) and the ports workers get."""

    processes: list[subprocess.Popen] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # HOST:PORT, as the coordinator reaches them
    advertised: list[str] = field(default_factory=list)  # :PORT, as workers are told

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "[::]", "::") else host


async def start_local_shards(count: int, bind: str, token: str | None = None, threads: int = 1,
                             timeout: float = 60.0) -> LocalShards:
    """Start `count` shard processes and wait until each listens (RuntimeError with its output otherwise)."""
    host, port = bind.rsplit(":", 1)
    shards = LocalShards()
    env = dict(os.environ, **{PARENT_VARIABLE: str(os.getpid())})
    env.pop("PS_TOKEN", None)
    env.pop("PS_TOKEN_FILE", None)
    if token:
        env["PS_TOKEN"] = token
    try:
        for i in range(count):
            shard_port = 0 if int(port) == 0 else int(port) + 1 + i
            cmd = [sys.executable, "-m", "ormo_ps.server.shard_cli", "--bind", f"{host}:{shard_port}",
                   "--threads", str(threads)]
            shards.processes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True))
        for i, proc in enumerate(shards.processes):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
            m = LISTENING.search(line)
            if m is None:
                raise RuntimeError(f"shard {i} did not start (exit {proc.poll()}): {line.strip() or 'no output'}")
            shards.addresses.append(f"{_connect_host(host)}:{m.group(2)}")
            shards.advertised.append(f":{m.group(2)}")
    except BaseException:
        shards.stop()
        raise
    logger.info("started %d shard processes: %s", count, ", ".join(shards.addresses))
    return shards
