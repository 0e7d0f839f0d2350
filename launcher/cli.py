"""`ps-launch`: start a server, K worker processes (some slow if asked) and an evaluator on this machine.

It shows progress from the server's status, waits for the run to finish, and prints the final result;
metrics, the checkpoint and the final parameters are left in the output directory. Ctrl-C, SIGTERM and SIGHUP
stop everything: the signal is passed on to every process, which ps-launch waits for (the server checkpoints).
On Linux a ps-launch that is killed outright (SIGKILL, the OOM killer) still takes its processes along: each
gets SIGTERM from the kernel when ps-launch dies (PR_SET_PDEATHSIG, which each asks for itself: common/parent.py),
so none trains on as an orphan.
A process that fails takes the run down, and its error line is shown here, not only in its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import click
import grpc

from ormo_ps.common import live_tensorboard, settings
from ormo_ps.common.cli_options import env_names, run_cli
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.metrics import LAUNCH_FILE, read_metrics
from ormo_ps.common.observe import metrics_address
from ormo_ps.common.parent import PARENT_VARIABLE
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.progress import Progress
from ormo_ps.common.security import ClientSecurity
from ormo_ps.server.serving import listening_port
from ormo_ps.server.config import RunConfig

EXIT_DIVERGED = 3  # as ps-server's, ps-worker's and ps-sim's


class Diverged(click.ClickException):
    """The run diverged: ps-launch exits 3, as ps-server, ps-worker and ps-sim do."""

    exit_code = EXIT_DIVERGED


# Beside metrics.jsonl with --metrics-port: where each process serves its metrics, as Prometheus' file-based
# service discovery reads targets (file_sd_configs), so a local Prometheus can scrape a ps-launch run.
TARGETS_FILE = "prometheus_targets.json"


class Processes:
    """The launched processes; all of them are stopped on exit, whatever happens."""

    def __init__(self, log_dir: Path, token: str, own_variables: frozenset[str] = frozenset()) -> None:
        self.log_dir = log_dir
        self.token = token  # every process of the run shares it (PS_TOKEN); nobody else gets in
        self.own_variables = own_variables  # ps-launch's PS_* settings: its processes get them as flags
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self, name: str, argv: list[str], *, capture_output: bool = False, nice: int = 0) -> subprocess.Popen:
        """Start `name`; its output goes to NAME.log, or (capture_output) to a pipe the caller copies there."""
        log = open(self.log_path(name), "w")
        self._logs.append(log)
        env = {k: v for k, v in os.environ.items() if k not in self.own_variables}  # PS_SLOWDOWN: not for all
        # The child asks for SIGTERM when this process dies (common/parent.py: no preexec_fn, see there why).
        env |= {"PYTHONUNBUFFERED": "1", "PS_TOKEN": self.token, PARENT_VARIABLE: str(os.getpid())}
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # nice(1) execs the command: the same process, niced
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture_output else log,
                                stderr=subprocess.STDOUT if capture_output else log,
                                stdin=subprocess.DEVNULL, env=env, text=True)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def failure(self, name: str) -> str:
        """What a process that exited says about it: its exit and its error line (from its log)."""
        code = self.procs[name].returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{name.replace('-', ' ')} {how}: {error_line(self.log_path(name))}\n(its log: {self.log_path(name)})"

    def check(self) -> None:
        """Raise the error of the first process that failed (the server first: the others fail after it); a
        process that ended because the run diverged makes it `Diverged` (ps-launch's exit code 3)."""
        for name, proc in self.procs.items():
            if proc.poll() not in (None, 0):
                raise (Diverged if proc.returncode == EXIT_DIVERGED else click.ClickException)(self.failure(name))

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM to every process still running, then wait for them (SIGKILL after `timeout` seconds)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


# A traceback's last line ("RuntimeError: Failed to bind ...") when a process died of an uncaught exception.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(: .*)?$")


def error_line(log: Path) -> str:
    """The line of a process's log that says why it failed: click's `Error: ...` line, else the exception
    that ended a traceback, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ")
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else "(its log is empty)"


class _Interrupted(Exception):
    """ps-launch received SIGTERM or SIGHUP: stop every process, then exit 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within: the first of `signals` raises `_Interrupted` (so the processes are stopped on the way out);
    more of them while stopping are ignored. The previous handlers are restored after."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def on_signal(signum: int, frame: object) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise _Interrupted(signum)

    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_port(procs: Processes, timeout: float, say: Callable[[str], None]) -> int:
    """Wait for the server's `listening on` line (as long as it runs, up to `timeout` seconds); all its output
    is copied to its log, and what `_relay` picks is said."""
    proc, log_path = procs.procs["server"], procs.log_path("server")
    found: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        with open(log_path, "a") as log:
            for line in proc.stdout:
                port = listening_port(line)
                if port is not None and not found:
                    found.append(port)
                    ready.set()
                if (message := _relay(line)) is not None:
                    say(message)
                log.write(line)
                log.flush()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not ready.wait(timeout):
        raise click.ClickException(f"the server did not listen within {timeout:.0f}s; its last line: "
                                   f"{error_line(log_path)}\n(its log: {log_path})")
    if not found:
        reader.join(5)  # its output is all in the log now
        proc.wait(10)
        raise click.ClickException(procs.failure("server"))
    return found[0]


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@settings.click_options(RunConfig)
@click.option("--slow-workers", type=click.IntRange(min=0), default=0, help="How many of the K workers are slow.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=4.0, help="How many times slower a slow worker is.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/launch",
              help="Output directory: metrics.jsonl, checkpoint.pt, final.pt, launch.json and one log per process.")
@click.option("--eval-every", type=click.FloatRange(min=0), default=1.0, help="Epochs between evaluations (0: end only).")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="torch threads per worker process (K processes share this machine's cores).")
@click.option("--worker-nice", type=click.IntRange(min=0, max=19), default=0,
              help="Run the workers at this nice level: when K workers oversubscribe the cores, the server and "
                   "the evaluator keep up (evaluations land where asked instead of whenever the CPU allows).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=0, help="Server port on 127.0.0.1 (0: any free).")
@click.option("--shards", type=click.IntRange(min=1, max=64), default=1,
              help="Shard the server's parameters over this many processes (ps-server --shards): the same "
                   "parameters, bit for bit, with the bytes and the updates spread over processes.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None, metavar="PORT",
              help="Serve every process's Prometheus metrics on 127.0.0.1: the server's on PORT, the evaluator's on "
                   "PORT+1, worker k's on PORT+2+k (0: each on a free port). The addresses are said and written to "
                   f"OUT/{TARGETS_FILE} (Prometheus' file_sd format). Off when not given.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None, metavar="DIRECTORY",
              help="The server and the evaluator write the progress and eval records as TensorBoard events while "
                   "the run trains, into DIRECTORY/<--out's name> (and .../eval): `tensorboard --logdir DIRECTORY` "
                   "shows the run live.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, help="Give up after this many seconds.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress lines.")
def cli(**kw) -> None:
    """Run a whole training run locally: ps-server, K x ps-worker and ps-eval as processes."""
    run = settings.pop_settings(RunConfig, kw)
    if run.model_from_client:
        raise click.UsageError(f"ps-launch's workers build the model the server names: give --model a name or an "
                               f"import path (--model {run.model} is for a ps-server whose clients bring their own)")
    if kw["slow_workers"] > run.workers:
        raise click.UsageError(f"--slow-workers {kw['slow_workers']} is more than --workers {run.workers}")
    if kw["metrics_port"] and kw["metrics_port"] + 1 + run.workers > 65535:
        raise click.UsageError(f"--metrics-port {kw['metrics_port']} leaves no room for the evaluator's and "
                               f"{run.workers} workers' ports after it (at most {65535 - 1 - run.workers})")
    if kw["tensorboard"] is not None:
        try:
            live_tensorboard.check(kw["tensorboard"])
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    out = Path(kw["out"])
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # a fresh run; --resume belongs to ps-server
    launch = dict(workers=run.workers, slow_workers=kw["slow_workers"],
                  slowdown=kw["slowdown"] if kw["slow_workers"] else 1.0, eval_every=kw["eval_every"],
                  threads=kw["threads"], worker_nice=kw["worker_nice"], shards=kw["shards"])
    (out / LAUNCH_FILE).write_text(json.dumps(launch) + "\n")  # for ps-plot: the server cannot tell slow workers
    console = _Console(kw["quiet"])
    procs = Processes(out, os.environ.get("PS_TOKEN") or secrets.token_urlsafe(24), frozenset(env_names(cli)))
    started = time.monotonic()
    with _signals_interrupt():
        try:
            try:
                _launch(run, kw, out, procs, console, started)
            finally:
                console.close()
                procs.stop_all()
        except _Interrupted as e:
            procs.stop_all()  # again, when the signal came while stopping
            click.echo(f"ps-launch: {e}: stopped the server (its checkpoint is in {out}), the workers and the "
                       "evaluator", err=True)
            raise SystemExit(128 + e.signum) from None
    if _report(out, time.monotonic() - started).get("diverged"):
        click.echo(f"Error: the run diverged (see {out / 'server.log'}); the last finite parameters are in {out}",
                   err=True)
        raise SystemExit(EXIT_DIVERGED)


def _launch(run: RunConfig, kw: dict, out: Path, procs: Processes, console: _Console, started: float) -> None:
    """Start the server, then the workers and the evaluator, and watch them until the run is evaluated."""
    py = [sys.executable, "-m"]
    metrics_port = kw["metrics_port"]

    def metrics(offset: int) -> list[str]:
        """A process's --metrics-port: PORT + offset, or each a free one (0)."""
        return [] if metrics_port is None else ["--metrics-port", str(metrics_port + offset if metrics_port else 0)]

    tensorboard = ["--tensorboard", kw["tensorboard"]] if kw["tensorboard"] is not None else []
    console.say(f"starting ps-server (log: {procs.log_path('server')})")
    procs.start("server", py + ["ormo_ps.server.cli", *run.to_flags(), "--bind",
                                 f"127.0.0.1:{kw['port']}", "--out", str(out), "--linger", "60", *metrics(0),
                                 *tensorboard, *(["--shards", str(kw["shards"])] if kw["shards"] > 1 else [])],
                capture_output=True)
    port = _read_port(procs, timeout=kw["timeout"], say=lambda m: console.say(f"server: {m}"))
    address = f"127.0.0.1:{port}"
    slow = f" ({kw['slow_workers']} {kw['slowdown']:g}x slower)" if kw["slow_workers"] else ""
    console.say(f"server on {address}: {run.algo}, K={run.workers}{slow}, {run.model_name} on {run.dataset}; "
                f"starting the workers and the evaluator; logs in {out}")
    data = ["--data-dir", run.data_dir] if run.data_dir else []
    # The evaluator first, polling often: ready as the run starts, it evaluates along even a run of a second.
    evaluator = procs.start("evaluator", py + ["ormo_ps.worker.evaluator", "--server", address, "--out", str(out),
                                                "--eval-every", str(kw["eval_every"]), "--poll", "0.05",
                                                "--threads", "1", *data, *metrics(1), *tensorboard])
    for k in range(run.workers):
        slow = k >= run.workers - kw["slow_workers"]
        procs.start(f"worker-{k}", py + ["ormo_ps.worker.cli", "--server", address, "--threads", str(kw["threads"]),
                                          "--name", f"local-{k}", *data,
                                          *(["--slowdown", str(kw["slowdown"])] if slow else []), *metrics(2 + k)],
                    nice=kw["worker_nice"])
    targets = MetricsTargets(procs, out / TARGETS_FILE, console.say) if metrics_port is not None else None
    _watch(address, procs, evaluator, console, kw["timeout"], started, ClientSecurity(token=procs.token),
           run.workers, out / "metrics.jsonl", targets)


class MetricsTargets:
    """The metrics endpoints of the launched processes, read from the line each prints once it serves them
    (common/observe.py's METRICS_LINE, in its log), and written to `path` as Prometheus file_sd targets each
    time more are known. A process's log is read until its line is found, no longer."""

    def __init__(self, procs: Processes, path: Path, say: Callable[[str], None]) -> None:
        self.procs = procs
        self.path = path
        self.say = say
        self.found: dict[str, tuple[str, int]] = {}  # process name -> (host, port)

    def scan(self) -> None:
        new = False
        for name in self.procs.procs:
            if name in self.found:
                continue
            try:
                text = self.procs.log_path(name).read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if (address := metrics_address(line)) is not None:
                    self.found[name] = address[1:]
                    new = True
                    break
        if not new:
            return
        targets = [{"targets": [f"{host}:{port}"], "labels": {"role": name.split("-")[0], "process": name}}
                   for name, (host, port) in self.found.items()]
        partial = self.path.with_suffix(".json.partial")
        partial.write_text("[\n" + ",\n".join(json.dumps(t) for t in targets) + "\n]\n")
        partial.replace(self.path)  # Prometheus never reads half a file
        if len(self.found) == len(self.procs.procs):
            host, port = self.found["server"]
            self.say(f"metrics: the server's on http://{host}:{port}/metrics; all {len(self.found)} processes' in "
                     f"{self.path} (Prometheus file_sd)")


class _Console:
    """What ps-launch says on stderr (nothing with --quiet): its messages, and once the run's length is known a
    progress meter (a bar on a terminal, a line every few seconds with rate and time left elsewhere)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.meter: Progress | None = None
        self.finished = False  # the run's summary is written: the server may exit, the evaluator finishes

    def say(self, line: str) -> None:
        if not self.quiet:
            (self.meter.write if self.meter else lambda m: click.echo(m, err=True))(line)

    def progress(self, status: pb.Status, workers: int) -> None:
        """The server's status. Counts and rates are on the server's clock (its uptime), as its records' times."""
        if self.quiet:
            return
        if self.meter is None:
            self.meter = Progress(status.config.total_iterations)
        self.meter.update(status.iteration, at=status.uptime_seconds, epoch=status.epoch,
                          workers=f"{status.workers_connected}/{workers}")

    def recorded(self, record: dict) -> None:
        """A new record in the run's metrics: progress (exact times, between two polls) and an evaluation's
        accuracy are shown; the summary says the training is over (the evaluator then evaluates the final
        parameters: seconds for a large model)."""
        if record["event"] == "progress" and self.meter is not None:
            self.meter.update(record["iteration"], at=record["time"], epoch=record["epoch"],
                              loss=record["train_loss"])
        elif record["event"] == "eval" and self.meter is not None:
            self.meter.show(test_acc=record["test_accuracy"])
        elif record["event"] == "summary":
            self.finished = True
            if self.meter is not None:
                self.meter.fields.pop("workers", None)
                self.meter.update(record["iterations"], at=record["time"], epoch=record["epochs"],
                                  loss=record["final_train_loss"])
            self.say(f"the run finished at iteration {record['iterations']} ({record['time']:.1f} s after the server "
                     "started); the evaluator evaluates the final parameters")

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()


def _relay(line: str) -> str | None:
    """What of a server log line ps-launch repeats on the console: data-set decoding and downloads (long
    silences otherwise), warnings and errors."""
    m = _LOG_LINE.match(line.strip())
    if m is None:
        return None
    if m["level"] in ("WARNING", "ERROR", "CRITICAL") or (m["name"] == "ormo_ps.common.data"
                                                         and m["message"].startswith(("decoding", "downloading"))):
        return m["message"]
    return None


_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<name>[\w.]+)(?: \[[^]]*\])?: (?P<message>.*)$")


def _new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete records appended to a metrics file since `offset`, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def _watch(address: str, procs: Processes, evaluator: subprocess.Popen, console: _Console, timeout: float,
           started: float, security: ClientSecurity, workers: int, metrics: Path,
           targets: MetricsTargets | None = None) -> None:
    """Progress until the evaluator has evaluated the final parameters (it exits then)."""
    offset = 0
    with security.channel(address, GRPC_OPTIONS) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        while evaluator.poll() is None:
            if targets is not None:
                targets.scan()
            records, offset = _new_records(metrics, offset)  # first: the summary is written before the server exits
            for record in records:
                console.recorded(record)
            procs.check()
            if procs.procs["server"].poll() is not None and not console.finished:
                raise click.ClickException(f"the server stopped before the end of the run\n"
                                           f"(its log: {procs.log_path('server')})")
            if time.monotonic() - started > timeout:
                raise click.ClickException(f"the run did not finish within {timeout:.0f}s")
            try:
                s = stub.GetStatus(pb.GetStatusRequest(), timeout=5, metadata=security.call_metadata())
                if not s.done:
                    console.progress(s, workers)
            except grpc.RpcError:
                pass  # the server is gone once the evaluator has the final parameters
            time.sleep(1.0)
    for record in _new_records(metrics, offset)[0]:
        console.recorded(record)
    if evaluator.returncode != 0:
        raise click.ClickException(procs.failure("evaluator"))


def _report(out: Path, seconds: float) -> dict:
    """The run's result as one JSON line on stdout (from its metrics); the summary record returned."""
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    evals = [r for r in records if r["event"] == "eval"]
    summary = next((r for r in reversed(records) if r["event"] == "summary"), {})
    result = dict(algo=summary.get("algo"), workers=summary.get("workers"), iterations=summary.get("iterations"),
                  epochs=summary.get("epochs"), seconds=round(seconds, 1),
                  final_test_accuracy=evals[-1]["test_accuracy"] if evals else None,
                  final_test_loss=evals[-1]["test_loss"] if evals else None,
                  final_train_loss=summary.get("final_train_loss"),
                  gradients_applied=summary.get("gradients_applied"),
                  gradients_rejected=summary.get("gradients_rejected"),
                  staleness_mean=summary.get("staleness_mean"), diverged=bool(summary.get("diverged")),
                  out_dir=str(out))
    click.echo(json.dumps(result))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-launch")


if __name__ == "__main__":
    main()
