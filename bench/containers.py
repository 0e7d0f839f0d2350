"""The user's first command for real: `docker compose up --scale worker=N` on this Docker host, measured.

Drives the repository's docker-compose.yml (the image must be built: `make image`) through one scenario,
watches the server's log, samples every container's memory with `docker stats`, copies the results volume
out at the end and checks it. Each scenario writes `OUT/<scenario>.json` and a transcript `OUT/<scenario>.log`:

    python -m bench.containers hom --workers 64                 # PS_WORKERS=64 docker compose up --scale worker=64
    python -m bench.containers het --workers 48 --slow 16       # ... --scale worker=48 --scale slow-worker=16
    python -m bench.containers faults --workers 16              # kill the server, resume; kill 4 workers, restart one
    python -m bench.containers cifar --workers 8 --data ORMO_DATA_DIR   # CIFAR-10 through the read-only mount
    python -m bench.containers hom --workers 16 --sharded       # ... with deploy/compose.sharded.yml
    python -m bench.containers shard-faults --workers 4 --sharded   # kill a shard mid-run, resume as the file says

`--sharded` adds deploy/compose.sharded.yml (S = 2 `ps-shard` services, the server their coordinator). The
shards serve until stopped: once every other container has exited, they are stopped as a user would
(`docker compose stop shard-0 shard-1`), and their exit codes count with the others'.

Extra `KEY=VALUE` arguments after `--env` reach compose's environment (PS_ITERATIONS=2000, PS_ALGO=...).
Every container this starts belongs to the compose project `--project` and is removed at the end, volumes
included (`--keep` leaves them). Traffic stays on the project's own compose network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import harness

ROOT = harness.REPO
COMPOSE_FILE = ROOT / "docker-compose.yml"
SHARDED_FILE = ROOT / "deploy" / "compose.sharded.yml"
# The server's logger (ormo_ps.server.service; server.service before the package was named ormo_ps).
SERVICE = r"INFO (?:ormo_ps\.)?server\.service:"
STARTED = re.compile(rf"^(\S+ \S+) {SERVICE} run started with (\d+) workers", re.M)
ITERATION = re.compile(rf"^(\S+ \S+) {SERVICE} iter (\d+)/(\d+) ", re.M)
CONNECTED = re.compile(rf"^(\S+ \S+) {SERVICE} worker \d+ registered .*, (\d+)/\d+ connected", re.M)
CHECKPOINT = re.compile(r"checkpoint at iteration (\d+) written")
REGISTERED = re.compile(r"worker (\d+) registered \(([^,]+), slowdown ([\d.]+)\)")


def _log_time(stamp: str) -> float:
    """A server log line's time (`2026-12-01 11:08:31,624`, the containers' clock is the host's) as epoch seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _mib(text: str) -> float:
    """`docker stats` sizes (`245.3MiB`, `1.2GiB`, `980kB`) in MiB."""
    m = re.match(r"([\d.]+)\s*([KMGT]i?B|B)", text.strip(), re.I)
    if not m:
        return float("nan")
    factor = {"b": 1 / 2**20, "kb": 1e3 / 2**20, "kib": 1 / 2**10, "mb": 1e6 / 2**20, "mib": 1.0,
              "gb": 1e9 / 2**20, "gib": 2**10, "tb": 1e12 / 2**20, "tib": 2**20}[m.group(2).lower()]
    return float(m.group(1)) * factor


def host_memory_used_mib() -> float:
    """MemTotal - MemAvailable: what the host's processes (all containers included) hold."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


@dataclass
class MemorySampler:
    """`docker stats` for the project's containers every `interval` seconds, in a background thread."""

    project: str
    interval: float = 5.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="docker-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
                                 capture_output=True, text=True, timeout=60).stdout.split()
            if ids:
                out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}", *ids],
                                     capture_output=True, text=True, timeout=120).stdout
                per = {}
                for line in out.splitlines():
                    name, _, usage = line.partition("\t")
                    per[name] = _mib(usage.split("/")[0])
                self.samples.append({"time": t, "host_used_mib": host_memory_used_mib(), "containers": per})
            self._stop.wait(self.interval)

    def summary(self, project: str) -> dict[str, Any]:
        """Per service: the largest sample of any one container, and the mean over containers of their largest."""
        peak: dict[str, float] = {}
        for s in self.samples:
            for name, mib in s["containers"].items():
                peak[name] = max(peak.get(name, 0.0), mib)
        services: dict[str, list[float]] = {}
        for name, mib in peak.items():
            service = re.sub(rf"^{re.escape(project)}-(.+)-\d+$", r"\1", name)
            services.setdefault(service, []).append(mib)
        return {
            "per_service": {s: {"containers": len(v), "peak_mib_max": round(max(v), 1),
                                "peak_mib_mean": round(sum(v) / len(v), 1)} for s, v in sorted(services.items())},
            "host_used_mib_max": round(max((s["host_used_mib"] for s in self.samples), default=0.0), 1),
            "samples": len(self.samples),
        }


class Compose:
    """`docker compose` on the repository's file, one project, with a transcript of every command."""

    def __init__(self, project: str, env: dict[str, str], transcript: Callable[[str], None],
                 files: tuple[Path, ...] = (COMPOSE_FILE,)) -> None:
        self.project = project
        self.env = os.environ | env
        self.say = transcript
        self.files = files

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, quiet: bool = False,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        argv = ["docker", "compose", "-p", self.project, *files, *args]
        if not quiet:
            shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
            extra = [arg for f in self.files for arg in ("-f", str(f.relative_to(ROOT)))] if len(self.files) > 1 else []
            self.say(f"$ {shown + ' ' if shown else ''}{' '.join(argv[:2] + extra + list(args))}")
        done = subprocess.run(argv, cwd=ROOT, env=self.env | (env or {}), capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def server_log(self) -> str:
        return self("logs", "--no-color", "--no-log-prefix", "server", quiet=True, check=False).stdout

    def container_ids(self, service: str, *, running_only: bool = False) -> list[str]:
        args = ["ps", "-q"] + ([] if running_only else ["-a"]) + [service]
        return self(*args, quiet=True, check=False).stdout.split()

    def wait_for(self, predicate: Callable[[str], Any], timeout: float, what: str, poll: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self.server_log())
            if found:
                return found
            time.sleep(poll)
        raise TimeoutError(f"{what}: not within {timeout:.0f}s")

    def wait_all_exited(self, timeout: float, but: tuple[str, ...] = ()) -> None:
        """Until every container has exited, except those of the services `but` (left running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self("ps", "--format", "{{.Service}}", quiet=True, check=False).stdout.split()
            if not [s for s in running if s not in but]:
                return
            time.sleep(3)
        raise TimeoutError(f"containers still running after {timeout:.0f}s")

    def services(self) -> list[str]:
        return self("config", "--services", quiet=True).stdout.split()

    def exit_codes(self) -> dict[str, int]:
        out = self("ps", "-a", "--format", "{{.Name}}\t{{.ExitCode}}", quiet=True, check=False).stdout
        return {name: int(code) for name, _, code in (line.partition("\t") for line in out.splitlines()) if code}

    def copy_runs(self, dest: Path) -> Path:
        self("cp", "server:/runs", str(dest))
        return dest


def iterations_seen(log: str) -> int:
    found = ITERATION.findall(log)
    return int(found[-1][1]) if found else 0


def read_results(runs: Path) -> dict[str, Any]:
    """What the results volume holds: the server's summary, the evaluator's last record, final.pt."""
    records = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = next((r for r in reversed(records) if r["event"] == "summary"), None)
    evals = [r for r in records if r["event"] == "eval"]
    progress = [r for r in records if r["event"] == "progress"]
    starts = [r for r in records if r["event"] == "start"]
    return {"summary": summary, "last_eval": evals[-1] if evals else None, "evals": len(evals),
            "progress": progress, "starts": len(starts), "final_pt": (runs / "final.pt").is_file(),
            "checkpoint_pt": (runs / "checkpoint.pt").is_file(),
            "files": sorted(p.name for p in runs.iterdir())}


def updates_per_second(progress: list[dict[str, Any]]) -> float | None:
    """Server iterations per second of wall-clock time between the first and the last progress record of
    the last server process (after a resume, `time` restarts)."""
    last_part = progress
    for i in range(len(progress) - 1, 0, -1):
        if progress[i]["time"] < progress[i - 1]["time"]:
            last_part = progress[i:]
            break
    if len(last_part) < 2:
        return None
    first, last = last_part[0], last_part[-1]
    return (last["iteration"] - first["iteration"]) / max(1e-9, last["time"] - first["time"])


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or args.scenario
    log_path = out / f"{name}.log"
    transcript = open(log_path, "w", encoding="utf-8")

    def say(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {line}", file=sys.stderr, flush=True)
        transcript.write(f"[{stamp}] {line}\n")
        transcript.flush()

    total = args.workers + args.slow
    env = {"PS_WORKERS": str(total), "PS_DATASET": args.dataset}
    if args.data:
        env["ORMO_DATA"] = str(Path(args.data).resolve())
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env takes KEY=VALUE, got {item!r}")
        env[key] = value
    compose = Compose(args.project, env, say, (COMPOSE_FILE, SHARDED_FILE) if args.sharded else (COMPOSE_FILE,))
    shards = tuple(s for s in compose.services() if s.startswith("shard-"))
    scale = ["--scale", f"worker={args.workers}", "--scale", f"slow-worker={args.slow}"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    image = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}} {{.Size}}", env.get("ORMO_IMAGE", "ormo-ps:0.1.0")],
                           capture_output=True, text=True).stdout.split()
    result: dict[str, Any] = {"scenario": args.scenario, "workers": args.workers, "slow_workers": args.slow,
                              "shards": len(shards),
                              "env": env, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "commit": commit.strip(), "image": image[0][7:19] if image else None,
                              "image_gb": round(int(image[1]) / 1e9, 2) if len(image) > 1 else None,
                              "machine": f"{platform.platform()}, {os.cpu_count()} cores, "
                                         f"{round(host_memory_used_mib() + _available_mib())} MiB"}
    sampler = MemorySampler(args.project, interval=args.stats_every)
    compose("down", "-v", "--remove-orphans", quiet=True, check=False)
    baseline = host_memory_used_mib()
    result["host_used_mib_before"] = round(baseline, 1)
    try:
        t_up = time.time()
        files = " -f docker-compose.yml -f deploy/compose.sharded.yml" if args.sharded else ""
        say(" ".join(f"{k}={v}" for k, v in env.items()) + f" docker compose{files} up {' '.join(scale)}")
        compose("up", "-d", *scale, timeout=1800)
        sampler.start()
        healthy = time.time()
        result["seconds_up_command"] = round(healthy - t_up, 1)
        m = compose.wait_for(lambda log: STARTED.search(log), args.start_timeout, f"all {total} workers ready")
        result["seconds_until_all_ready"] = round(_log_time(m.group(1)) - t_up, 1)
        log = compose.server_log()
        slow_ids = sorted(int(w) for w, _, slow in REGISTERED.findall(log) if float(slow) > 1)
        say(f"all {m.group(2)} workers ready {result['seconds_until_all_ready']}s after `up`"
            f" ({len(slow_ids)} slow{f', {len(shards)} shards' if shards else ''})")
        if args.scenario == "faults":
            _faults(compose, args, result, say, scale)
        elif args.scenario == "shard-faults":
            _shard_faults(compose, args, result, say, scale, shards)
        compose.wait_all_exited(args.run_timeout, but=shards)
        result["seconds_until_exited"] = round(time.time() - t_up, 1)
        if shards:  # they serve until stopped: what the user does once the run is over
            compose("stop", *shards, timeout=300)
        codes = compose.exit_codes()
        bad = {n: c for n, c in codes.items() if c != 0}
        result["containers_exited_0"] = sum(1 for c in codes.values() if c == 0)
        result["containers_exited_non_zero"] = bad
        say(f"all {len(codes)} containers exited; non-zero exits: {bad or 'none'}")
        runs = compose.copy_runs(Path(tempfile.mkdtemp(prefix="ormo-compose-")) / "runs")
        found = read_results(runs)
        summary = found["summary"] or {}
        per_worker = summary.get("gradients_per_worker", [])
        result.update(
            files=found["files"], final_pt=found["final_pt"], evals=found["evals"], start_records=found["starts"],
            iterations=summary.get("iterations"), total_iterations=(found["progress"] or [{}])[-1].get("iteration"),
            gradients_applied=summary.get("gradients_applied"), gradients_rejected=summary.get("gradients_rejected"),
            updates_per_second=_round(updates_per_second(found["progress"])),
            final_test_accuracy=(found["last_eval"] or {}).get("test_accuracy"),
            gradients_per_worker=per_worker)
        if slow_ids and per_worker:
            fast = [g for k, g in enumerate(per_worker) if k not in slow_ids]
            slow = [per_worker[k] for k in slow_ids]
            result["gradients_mean_fast"] = round(sum(fast) / len(fast), 1)
            result["gradients_mean_slow"] = round(sum(slow) / len(slow), 1)
            result["slow_over_fast"] = round(result["gradients_mean_slow"] / result["gradients_mean_fast"], 3)
        shutil.rmtree(runs.parent, ignore_errors=True)
    finally:
        sampler.stop()
        result["memory"] = sampler.summary(args.project)
        result["memory"]["host_used_mib_over_baseline_max"] = round(result["memory"]["host_used_mib_max"] - baseline, 1)
        if not args.keep:
            compose("down", "-v", "--remove-orphans", quiet=True, check=False)
        transcript.close()
    harness.write_json(out / f"{name}.json", result)
    return result


def _resume(compose: Compose, args: argparse.Namespace, result: dict[str, Any], say, scale: list[str]) -> None:
    """`PS_RESUME=/runs ... up -d`: where the server resumed, and how long until every worker was back."""
    t_resume = time.time()
    compose("up", "-d", *scale, env={"PS_RESUME": "/runs"}, timeout=1800)
    resumed = compose.wait_for(lambda log: re.search(r"resuming \S+ at iteration (\d+)", log), 300, "the resume")
    result["resumed_at"] = int(resumed.group(1))
    total = args.workers + args.slow
    back = compose.wait_for(lambda log: next((m for m in CONNECTED.finditer(log) if int(m.group(2)) == total), None),
                            args.start_timeout, "the workers to reconnect")
    result["seconds_until_reconnected"] = round(_log_time(back.group(1)) - t_resume, 1)
    say(f"resumed at iteration {result['resumed_at']}; all workers back {result['seconds_until_reconnected']}s "
        "after `up`")


def _faults(compose: Compose, args: argparse.Namespace, result: dict[str, Any], say, scale: list[str]) -> None:
    """Kill the server mid-run and resume it as the README says; kill 4 workers mid-run and restart one."""
    kill_at = args.kill_at
    compose.wait_for(lambda log: iterations_seen(log) >= kill_at, args.run_timeout, f"iteration {kill_at}")
    saved = compose.wait_for(lambda log: CHECKPOINT.findall(log), args.run_timeout, "a checkpoint")
    result["checkpoint_before_kill"] = int(saved[-1])
    compose("kill", "server")
    killed_at = iterations_seen(compose.server_log())
    say(f"server killed at iteration ~{killed_at}")
    result["server_killed_at"] = killed_at
    time.sleep(5)
    _resume(compose, args, result, say, scale)
    target = result["resumed_at"] + args.kill_at
    compose.wait_for(lambda log: iterations_seen(log) >= target, args.run_timeout, f"iteration {target}")
    victims = compose.container_ids("worker", running_only=True)[:4]
    subprocess.run(["docker", "kill", *victims], capture_output=True, text=True, timeout=120, check=True)
    at = iterations_seen(compose.server_log())
    say(f"killed 4 worker containers at iteration ~{at}")
    result["workers_killed_at"] = at
    compose.wait_for(lambda log: iterations_seen(log) >= at + args.kill_at // 2, args.run_timeout,
                     "the run to go on without them")
    before = len(REGISTERED.findall(compose.server_log()))
    subprocess.run(["docker", "start", victims[0]], capture_output=True, text=True, timeout=120, check=True)
    compose.wait_for(lambda log: len(REGISTERED.findall(log)) > before, 300, "the restarted worker to register")
    rejoin = REGISTERED.findall(compose.server_log())[-1]
    say(f"restarted worker container rejoined as worker {rejoin[0]}")
    result["restarted_worker_rejoined_as"] = int(rejoin[0])


def _shard_faults(compose: Compose, args: argparse.Namespace, result: dict[str, Any], say, scale: list[str],
                  shards: tuple[str, ...]) -> None:
    """SIGKILL the last shard mid-run (the server stops: "resume with --resume"), then the resume command of
    deploy/compose.sharded.yml: the killed shard starts again, the server re-attaches and the shards load."""
    compose.wait_for(lambda log: iterations_seen(log) >= args.kill_at, args.run_timeout, f"iteration {args.kill_at}")
    saved = compose.wait_for(lambda log: CHECKPOINT.findall(log), args.run_timeout, "a checkpoint")
    result["checkpoint_before_kill"] = int(saved[-1])
    victim = shards[-1]
    compose("kill", victim)
    killed_at = iterations_seen(compose.server_log())
    say(f"{victim} killed at iteration ~{killed_at}")
    result["shard_killed_at"] = killed_at
    deadline = time.monotonic() + 300
    while compose.container_ids("server", running_only=True):
        if time.monotonic() > deadline:
            raise TimeoutError("the server still runs 300 s after a shard was killed")
        time.sleep(2)
    result["server_exit_code"] = next(c for n, c in compose.exit_codes().items() if n.endswith("-server-1"))
    last = compose.server_log().strip().splitlines()[-1]
    result["server_last_line"] = last
    say(f"server exited {result['server_exit_code']}: {last}")
    _resume(compose, args, result, say, scale)


def _available_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemAvailable"].split()[0]) / 1024


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser("containers", __doc__, out="containers")
    p.add_argument("scenario", choices=["hom", "het", "faults", "cifar", "shard-faults"])
    p.add_argument("--workers", type=int, default=64, help="replicas of `worker`")
    p.add_argument("--slow", type=int, default=0, help="replicas of `slow-worker`")
    p.add_argument("--dataset", default=None, help="PS_DATASET (default: digits; cifar10 for the cifar scenario)")
    p.add_argument("--data", default=None, help="ORMO_DATA: the folder holding <dataset>/ (mounted read-only)")
    p.add_argument("--env", nargs="*", default=[], help="more KEY=VALUE for compose (PS_ITERATIONS=...)")
    p.add_argument("--kill-at", type=int, default=300, help="faults: iterations before each kill")
    p.add_argument("--project", default="ormo-bench")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--stats-every", type=float, default=5.0)
    p.add_argument("--keep", action="store_true", help="leave the containers and volumes")
    p.add_argument("--sharded", action="store_true",
                   help="a sharded server: add deploy/compose.sharded.yml (S = 2 ps-shard services)")
    p.add_argument("--name", default=None, help="the result files' name, OUT/NAME.json (default: the scenario)")
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("cifar10" if args.scenario == "cifar" else "digits")
    if args.scenario == "shard-faults" and not args.sharded:
        p.error("shard-faults needs --sharded")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise SystemExit("no Docker engine answers: start dockerd (see `make test-containers`)")
    result = run_scenario(args)
    result["command"] = harness.command_line("containers", argv)
    harness.write_json(args.out / f"{args.name or args.scenario}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "gradients_per_worker"}, indent=1))


if __name__ == "__main__":
    main()
