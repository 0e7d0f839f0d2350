"""A real Slurm cluster on this machine: one controller and N compute nodes, each node a network namespace
with its own address, hostname and slurmd, joined by a bridge whose links can be shaped (rate, delay and
loss: `Profile`).

    python -m tests.slurm_cluster up --nodes 4 --profile cross-site   # prints the directory; Ctrl-C tears down

What it creates, all named with one random tag and removed by `Cluster.stop()` (by PID, then by name):

- namespaces `ormo-sl-TAG-br` (holding the bridge: Docker's FORWARD policy of DROP in the root namespace does
  not reach it), `ormo-sl-TAG-ctl` (the controller, 10.251.X.254) and `ormo-sl-TAG-nI` (node I, 10.251.X.I),
  the subnet chosen from the tag; no address outside these namespaces is configured or contacted;
- a private munged (its own key and socket under the cluster's directory; the machine's munge is untouched);
- slurmctld in the controller's namespace and one slurmd per node namespace, each in its own UTS namespace
  with the node's hostname (tasks see `hostname` = their node, as on a cluster). The daemons enter only the
  network namespace (`nsenter --net`): `ip netns exec` remounts /sys and slurmd 22.05 then fails to load its
  cgroup plugin. No cgroup plugin is used (proctrack/linuxproc, task/none);
- slurm.conf under the cluster's directory: Slurm's clients find it through SLURM_CONF (`Cluster.env`) and
  reach the controller from any of the namespaces (`Cluster.run`, `Cluster.node_run`).

Every node shares this machine's filesystem: the cluster's directory is the "shared storage" of a real
cluster. Needs root, `ip`, `nsenter`, `unshare`, `tc` and Debian's slurm-wlm and munge (`install()` gets
them with apt, about 15 s); `unavailable()` says why a machine cannot run it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

@dataclass(frozen=True)
class Profile:
    """A link's shape, set on every node's interface (egress: both ends of a node-to-node path are shaped, so
    `delay` is one way and a round trip between two nodes is twice it). `tc netem` sets all three where the
    kernel has it (sch_netem); where it has not, the rate is a token bucket (`tc tbf`), the loss an nftables
    rule dropping that share of the packets, and the delay cannot be applied (`Cluster.shape` says so)."""

    rate: str | None = None  # tc's units: 10gbit, 100mbit
    delay: str | None = None  # 0.1ms, 10ms
    loss_percent: float = 0.0

    def describe(self) -> str:
        parts = [f"{self.rate}/s" if self.rate else "", f"{self.delay} delay" if self.delay else "",
                 f"{self.loss_percent:g}% loss" if self.loss_percent else ""]
        return ", ".join(p for p in parts if p) or "unshaped"


PROFILES: dict[str, Profile] = {
    "none": Profile(),
    "datacenter": Profile(rate="10gbit", delay="0.1ms"),
    "cross-site": Profile(rate="1gbit", delay="10ms", loss_percent=0.1),
    "thin": Profile(rate="100mbit", loss_percent=1.0),
}
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge", "nft": "nftables"}
CPUS_PER_NODE = 8  # what each node declares (SlurmdParameters=config_overrides: more than the machine has)


def _run(argv: list[str], *, check: bool = True, timeout: float = 60, env: dict | None = None,
         ) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, env=env)


def _bits(rate: str) -> float:
    """tc's rate (10gbit, 100mbit, 1kbit) in bits per second."""
    for unit, factor in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise ValueError(f"a rate in tc's units (10gbit, 100mbit), got {rate!r}")


def unavailable() -> str | None:
    """Why this machine cannot run a cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "a Slurm cluster of network namespaces needs root"
    for tool in ("ip", "nsenter", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if missing and shutil.which("apt-get") is None:
        return f"{' and '.join(missing)} not installed and no apt-get to install them"
    probe = f"ormo-probe-{secrets.token_hex(3)}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def install() -> None:
    """Debian's slurm-wlm and munge, when missing (apt; the package registry is the one network used)."""
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if missing:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        got = _run(["apt-get", "install", "-y", "-q", *missing], check=False, timeout=600, env=env)
        if got.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(missing)} failed: {got.stderr.strip()[-500:]}")


@dataclass
class Cluster:
    nodes: int = 3
    profile: str = "none"
    slurmd_timeout: int = 30  # seconds without an answer before the controller declares a node DOWN
    base: Path | None = None  # the cluster's directory (default: a new one under /tmp)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown network profile {self.profile!r}; one of {', '.join(PROFILES)}")
        if not 1 <= self.nodes <= 200:
            raise ValueError(f"nodes must be 1..200, got {self.nodes}")
        self.dir = Path(self.base or tempfile.mkdtemp(prefix=f"ormo-slurm-{self.tag}-"))
        self.subnet = f"10.251.{int(self.tag, 16) % 250 + 1}"
        self.name = f"ormo{self.tag}"

    # ----- names and addresses -------------------------------------------------------------------
    def ns(self, what: str) -> str:
        return f"ormo-sl-{self.tag}-{what}"

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def address(self, node: str) -> str:
        return f"{self.subnet}.{self.node_names.index(node) + 1}"

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.254"

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment Slurm's clients need (and tasks inherit)."""
        return os.environ | {"SLURM_CONF": str(self.conf)}

    # ----- running things ------------------------------------------------------------------------
    def _in(self, ns: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol ...) from the controller's namespace."""
        return _run(self._in(self.ns("ctl"), list(argv)), check=check, timeout=timeout, env=self.env)

    def node_run(self, node: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in `node`'s network namespace (e.g. `ip link set eth0 down`)."""
        return _run(self._in(self.node_ns(node), list(argv)), check=check, timeout=timeout, env=self.env)

    def node_ns(self, node: str) -> str:
        return self.ns(f"n{self.node_names.index(node) + 1}")

    def _daemon(self, key: str, ns: str | None, hostname: str | None, argv: list[str]) -> None:
        log = open(self.dir / f"{key}.out", "w")
        cmd = argv
        if hostname is not None:  # its own UTS namespace: `hostname` says the node's name
            cmd = ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh", *argv]
        if ns is not None:
            cmd = self._in(ns, cmd)
        self.daemons[key] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=self.env, start_new_session=True)
        log.close()

    # ----- bring-up ------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> Cluster:
        try:
            self._network()
            self._write_config()
            self._start_daemons()
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        bridge = self.ns("br")
        for ns in (bridge, self.ns("ctl"), *(self.node_ns(n) for n in self.node_names)):
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", bridge, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", bridge, "link", "set", "br0", "up"])
        hosts = [(self.ns("ctl"), self.controller_address, False)]
        hosts += [(self.node_ns(n), self.address(n), True) for n in self.node_names]
        for i, (ns, addr, shaped) in enumerate(hosts):
            _run(["ip", "-n", bridge, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", bridge, "link", "set", f"port{i}", "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if shaped:
                self.shape(ns)

    def shape(self, ns: str, profile: str | None = None) -> str:
        """Set `profile` (default: the cluster's) on the interface of namespace `ns`; what was applied, in words
        (a part this kernel cannot apply is named as such)."""
        spec = PROFILES[profile or self.profile]
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        _run([*tc, "del", "dev", "eth0", "root"], check=False)
        _run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "ormo_shape"], check=False)
        if spec == Profile():
            return "unshaped"
        netem = [*(["delay", spec.delay] if spec.delay else []), *(["rate", spec.rate] if spec.rate else []),
                 *(["loss", f"{spec.loss_percent:g}%"] if spec.loss_percent else [])]
        if _run([*tc, "add", "dev", "eth0", "root", "netem", *netem], check=False).returncode == 0:
            return f"{spec.describe()} (netem)"
        applied = []
        if spec.rate:  # a bucket of 10 ms at the rate, packets queued up to 100 ms
            burst = max(64 * 1024, int(_bits(spec.rate) / 8 / 100))
            _run([*tc, "add", "dev", "eth0", "root", "tbf", "rate", spec.rate, "burst", str(burst), "latency", "100ms"])
            applied.append(f"{spec.rate}/s (tbf)")
        if spec.loss_percent:
            nft = ["ip", "netns", "exec", ns, "nft"]
            _run([*nft, "add", "table", "inet", "ormo_shape"])
            _run([*nft, "add chain inet ormo_shape out { type filter hook output priority 0; }"])
            _run([*nft, f"add rule inet ormo_shape out oifname eth0 numgen random mod 100000 < "
                        f"{round(spec.loss_percent * 1000)} drop"])
            applied.append(f"{spec.loss_percent:g}% loss (nftables)")
        if spec.delay:
            applied.append(f"NOT the {spec.delay} delay: this kernel has no sch_netem")
        return ", ".join(applied)

    def _write_config(self) -> None:
        for sub in ("ctld", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.address(n)} CPUs={CPUS_PER_NODE} State=UNKNOWN"
                          for n in self.node_names)
        d = self.dir
        self.conf.write_text(f"""\
# A test cluster of network namespaces (tests/slurm_cluster.py, tag {self.tag})
ClusterName={self.name}
SlurmctldHost=ormo-ctl({self.controller_address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/spool/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout}
SlurmctldTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=600
MailProg=/bin/true
{nodes}
PartitionName=ormo Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_daemons(self) -> None:
        self._daemon("munged", None, None, [
            "munged", "--foreground", "--force", f"--key-file={self.dir}/munge.key", f"--socket={self.dir}/munge.sock",
            f"--pid-file={self.dir}/munged.pid", f"--log-file={self.dir}/log/munged.log",
            f"--seed-file={self.dir}/munged.seed"])
        self._wait(lambda: (self.dir / "munge.sock").exists(), 20, "munged's socket")
        self._daemon("slurmctld", self.ns("ctl"), "ormo-ctl", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for n in self.node_names:
            self.start_slurmd(n)

    def start_slurmd(self, node: str) -> None:
        """(Re)start `node`'s slurmd (after `kill_node`, the node comes back: its link up again first)."""
        self.cut_link(node, up=True)
        self._daemon(f"slurmd-{node}", self.node_ns(node), node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for key, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{key} exited ({proc.returncode}) while waiting for {what}: "
                                       f"{(self.dir / f'{key}.out').read_text()[-1500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s (logs in {self.dir})")
            time.sleep(0.2)

    def node_states(self) -> dict[str, str]:
        got = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
        if got.returncode != 0:
            return {}
        return dict(line.split() for line in got.stdout.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 60, nodes: list[str] | None = None) -> None:
        want = nodes or self.node_names
        self._wait(lambda: all(self.node_states().get(n) == "idle" for n in want), timeout,
                   f"idle nodes {','.join(want)}")

    # ----- jobs ----------------------------------------------------------------------------------
    def submit(self, script: str | Path, variables: dict[str, str], *args: str) -> str:
        """`sbatch` `script` with `variables` added to the environment it exports; the job's id."""
        got = _run(self._in(self.ns("ctl"), ["sbatch", "--parsable", f"--output={self.dir}/job-%j.out", *args,
                                               str(script)]), env=self.env | variables)
        return got.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, NodeList, Restarts, ExitCode, BatchHost ...)."""
        got = self.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=20)
        return dict(item.split("=", 1) for item in got.stdout.split() if "=" in item)

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """The job's record once its state is one of `states`."""
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states

        try:
            self._wait(reached, timeout, f"job {job_id} in {sorted(states)}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last: {info}\n{self.job_output(job_id)[-2000:]}") from None
        return info

    def job_output(self, job_id: str) -> str:
        path = self.dir / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    # ----- faults --------------------------------------------------------------------------------
    def kill_node(self, node: str) -> None:
        """A node lost: its link cut, then its slurmd and every process in its namespace (its tasks) SIGKILLed.
        A machine that dies goes silent: it closes none of its TCP connections. Killed with its link up, the
        node's kernel would close them at once (FIN, RST), and the other nodes would see their peers gone
        before Slurm declares the node down (node2's slurmstepd cancels a step whose srun ran on the lost node,
        with whatever that step ran). `start_slurmd` brings the link back up."""
        self.cut_link(node)
        proc = self.daemons.pop(f"slurmd-{node}", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._kill_namespace(self.node_ns(node))

    def cut_link(self, node: str, up: bool = False) -> None:
        self.node_run(node, "ip", "link", "set", "eth0", "up" if up else "down")

    def start_requeued(self, job_id: str, timeout: float = 120, updates: int = 10) -> dict[str, str]:
        """Let a requeued job start now instead of after Slurm's wait; its record once RUNNING.

        Slurm 22.05 holds a requeued job PENDING (Reason=BeginTime) for about AuthInfo's cred_expire (120 s by
        default), a BeginTime it sets when the requeue has completed (the old allocation's nodes cleaned up; after
        a lost node, 10-15 s after the requeue here): a `scontrol update StartTime=now` sent right after the
        requeue left the job waiting. So this waits for the job PENDING on BeginTime, lifts it, and lifts it
        again (at most `updates` times, 5 s apart) while it is still held so, until the job runs or `timeout`
        passes."""
        deadline = time.monotonic() + timeout
        issued: list[float] = []
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") == "RUNNING":
                return info
            if (info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and len(issued) < updates
                    and (not issued or time.monotonic() - issued[-1] >= 5)):
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False, timeout=20)
                issued.append(time.monotonic())
            time.sleep(0.5)
        log = self.dir / "log" / "slurmctld.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise TimeoutError(f"job {job_id} not RUNNING {timeout:.0f} s after its requeue ({len(issued)} StartTime=now "
                           f"updates); last: {info}\nslurmctld.log:\n{tail}")

    # ----- teardown ------------------------------------------------------------------------------
    def _kill_namespace(self, ns: str) -> None:
        got = _run(["ip", "netns", "pids", ns], check=False)
        for pid in (int(p) for p in got.stdout.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Cancel the jobs, stop every daemon and process in the namespaces, remove the namespaces."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--quiet", "--full", "--partition", "ormo", check=False, timeout=20)
        for key, proc in reversed(list(self.daemons.items())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for ns in self.namespaces:  # job steps (slurmstepd, tasks) left in a node's namespace
            self._kill_namespace(ns)
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        self.daemons.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up"])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--profile", choices=list(PROFILES), default="none")
    parser.add_argument("--slurmd-timeout", type=int, default=30)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear down on SIGTERM too
    reason = unavailable()
    if reason:
        sys.exit(f"cannot run a cluster here: {reason}")
    install()
    with Cluster(nodes=args.nodes, profile=args.profile, slurmd_timeout=args.slurmd_timeout) as cluster:
        print(f"cluster {cluster.name} up in {cluster.dir}: nodes {', '.join(cluster.node_names)}; "
              f"export SLURM_CONF={cluster.conf} and run Slurm's commands with "
              f"`nsenter --net=/run/netns/{cluster.ns('ctl')} ...`; Ctrl-C tears it down", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
