"""Throughput of the sharded ps-server (`--shards S`) beside one server and a torch.distributed.rpc server (issue #23).

For each model size and number of pushers K, these groups of processes are started, paused, and measured in
alternating windows (bench/throughput's machinery: bench/throughput/groups.py, measure.py):

- `S=1`: `ps-server` (one process: bench/throughput's `server`), K pushers (bench/grad_pusher.py);
- `S=2`, `S=4`: `ps-server --shards S`: the coordinator and its S `ps-shard` children, each shard owning one
  contiguous slice of the flat vector; the same pushers speak the sharded protocol (a Train stream to the
  coordinator and one to each shard, the gradient cut into the shards' slices);
- `torch-rpc`: bench/torch_rpc_ps.py with K worker ranks (the existing baseline; it has no shards).

What is recorded for every window: updates/s (the pushers' replies, as bench/throughput counts them), the CPU
seconds (/proc/PID/stat utime + stime) of the ps-server process (the coordinator, or the whole server at S=1), of
each ps-shard child (found by its command line `ormo_ps.server.shard_cli` and its parent pid), of the pushers
together and of the whole machine, over the window; from them CPU seconds per update and bytes/s per shard (the
bytes of one round's messages to and from each shard, as the pushers measured them, times updates/s).

The coordinator's own cost: flat models of S x 1024 parameters (the smallest a shard slice can be) with K=16
pushers: the pushes/s the coordinator sustains when the tensors cost next to nothing, and its CPU seconds per push.

    python -m bench.sharded            # full run (~20 min on 2 cores): bench/results/sharded.{md,json}
    python -m bench.sharded --quick    # ResNet20, K=4, S=1,2 (~30 s): runs/bench/sharded_quick.{md,json}
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import harness
from bench.grad_pusher import DOWN_BYTES, MAX_SHARDS, PID, SERVER_PID, SHARD_DOWN, SHARD_UP, SHARDS, UP_BYTES
from bench.ps_server_sized import import_path
from bench.throughput.groups import Group, cpu_seconds, start_group
from bench.throughput.measure import _rotated, count_window, mem_available, median
from bench.throughput.plan import SIZES

# (K values, windows per system, minimum window seconds) per size. 25M runs with K=4 only: 16 pushers hold
# 2 x 100 MB each (their gradient and their receive buffer), ~3.5 GB per group, and four groups are alive at once
# (24 GiB here); a 25M round trip takes ~1 s through gRPC on 2 cores, so K=16 would need windows of ~10 s too.
FULL_PLAN = {"resnet20": ((4, 16), 3, 2.0), "11M": ((4, 16), 2, 4.0), "25M": ((4,), 2, 4.0)}
QUICK_PLAN = {"resnet20": ((4,), 2, 1.0)}
FULL_SHARDS, QUICK_SHARDS = (1, 2, 4), (1, 2)
COORDINATOR_K, COORDINATOR_REPS, COORDINATOR_WINDOW = 16, 3, 2.0
PROFILE_AT = ("resnet20", 4)  # where S=2's shard 0 and coordinator are profiled (--profile)
SLICE_ALIGN = 1024  # server/shards.py ALIGN: S x 1024 parameters give every shard one block
SHARD_MODULE = b"ormo_ps.server.shard_cli"
TITLE = "# Sharded ps-server: S = 1, 2, 4 shard processes beside torch.distributed.rpc"


def system_name(shards: int) -> str:
    return f"S={shards}"


# -- processes ---------------------------------------------------------------------------------------------------
def _ppid_and_cmdline(pid: int) -> tuple[int, bytes]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[1]), Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return -1, b""


def shard_children(server_pid: int) -> list[int]:
    """The ps-shard processes ps-server `server_pid` started (command line `ormo_ps.server.shard_cli`, that parent),
    by pid: in the order it started them (shard 0 first), which is the order of Welcome.shards."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid, cmdline = _ppid_and_cmdline(int(entry.name))
            if ppid == server_pid and SHARD_MODULE in cmdline:
                found.append(int(entry.name))
    return sorted(found)


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split among their users: torch-rpc's forked ranks), else RSS; 0 if gone."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


@dataclass
class Measured:
    """A system under test: bench/throughput's group, its shard processes (none at S=1 and for torch-rpc)."""

    name: str
    shards: int
    group: Group
    shard_pids: list[int]
    numel: int

    @property
    def server_pid(self) -> int:
        """The process that holds the parameters or orders the pushes: ps-server, or torch-rpc's server rank."""
        if self.name == "torch-rpc":
            return int(self.group.control[-1, SERVER_PID])
        return self.group.server.pid

    def pids(self) -> list[int]:
        g = self.group  # its processes, the shards, and the pids the pushers and torch-rpc's ranks wrote
        written = {int(x) for x in g.control[: g.k, PID] if x} | {int(g.control[-1, SERVER_PID])}
        return sorted(({p.pid for p in g.procs} | set(self.shard_pids) | written) - {0})

    def cpu(self) -> dict:
        server, pushers, _main, machine = self.group.cpu()
        return dict(server=server, shards=[cpu_seconds(p) for p in self.shard_pids], pushers=pushers,
                    machine=machine)


def start_system(name: str, shards: int, size: str, numel: int, k: int, workdir: Path) -> Measured:
    base = "torch-rpc" if name == "torch-rpc" else "server"
    args = ["--shards", str(shards)] if shards > 1 else None
    # Flat sizes by import path (every S alike): the shards resolve the run's model too (bench/ps_server_sized.py).
    model = None if size == "resnet20" or base == "torch-rpc" else import_path(numel)
    group = start_group(base, size, numel, k, workdir, server_args=args, model=model)
    try:
        pids = shard_children(group.server.pid) if shards > 1 else []
        if len(pids) != shards and shards > 1:
            raise RuntimeError(f"{name}: found {len(pids)} ps-shard children of {group.server.pid}, expected {shards}")
        pushers_shards = {int(x) for x in group.control[:k, SHARDS]}
        if base == "server" and pushers_shards != {shards if shards > 1 else 0}:
            raise RuntimeError(f"{name}: the pushers saw {pushers_shards} shards")
        group.pause()
    except BaseException:
        group.close()
        raise
    return Measured(name, shards, group, pids, numel)


def estimated_bytes(name: str, shards: int, numel: int, k: int) -> int:
    """Rough peak memory of a group while it pushes: each pusher ~3 tensors and its interpreter; the server side
    ~4 tensors per pusher over all its processes (gradients received, parameters being sent, gRPC's buffers: at
    11M with K=16, one server's anonymous memory reached 2.0 GB and each of two shards' 1.5 GB) and its torch
    (~350 MB a process); torch-rpc's forked ranks share torch's pages."""
    msg = 4 * numel
    if name == "torch-rpc":
        return (k + 1) * (3 * msg + (60 << 20)) + (300 << 20)
    return k * (3 * msg + (60 << 20)) + 4 * k * msg + (shards + 1) * (350 << 20) + 4 * msg


MINE: set[int] = set()  # the pids of every group of this run that is alive (excluded from "others")


def all_cpu() -> dict[int, tuple[float, bool]]:
    """(CPU seconds, is a kernel thread) of every process on the machine, by pid. Kernel threads (kthreadd's
    children: ksoftirqd, kworkers) do part of the loopback TCP work of this benchmark's own processes."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            ppid, _ = _ppid_and_cmdline(pid)
            out[pid] = (cpu_seconds(pid), pid == 2 or ppid == 2)
    return out


def others_seconds(before: dict, after: dict, kernel: bool = False) -> float:
    """CPU seconds between two snapshots of the processes that are not this benchmark's: other users' processes
    (kernel=False), or kernel threads (kernel=True). Processes that came or went between them count from what
    both saw."""
    skip = MINE | {os.getpid()}
    return sum(max(0.0, after[p][0] - before[p][0]) for p in after.keys() & before.keys()
               if p not in skip and after[p][1] == kernel)


# -- where the time goes ---
def profile_system(m: Measured, settle: float, tmp: Path, log, seconds: float = 5.0) -> dict:  # noqa: ANN001
    """py-spy (bench/throughput/profile.py) on shard 0 (Python frames, then native frames too) and on the
    coordinator (Python frames) while the pushers push; the top functions of each."""
    from bench.throughput.profile import py_spy_profile

    out: dict = dict(system=m.name, k=m.group.k, numel=m.numel)
    m.group.resume()
    try:
        time.sleep(settle)
        for who, pid, mode in (("shard 0", m.shard_pids[0], "python"), ("shard 0", m.shard_pids[0], "native"),
                               ("coordinator", m.server_pid, "python")):
            log(f"  profiling {m.name} {who} (pid {pid}) for {seconds:.0f}s with py-spy ({mode} frames) ...")
            prof = py_spy_profile(pid, seconds, tmp / f"profile-{who.replace(' ', '')}-{mode}.txt", mode)
            for key in ("self", "total", "files"):
                prof[key] = prof.get(key, [])[:12]
            out[f"{who} {mode}"] = prof
    finally:
        m.group.pause()
    return out


# -- windows -------------------------------------------------------------------------------------------------------
def measure_window(m: Measured, settle: float, window: float, window_max: float) -> dict:
    """One window as bench/throughput's (`count_window`), with the CPU of every shard process and of every other
    process on the machine too."""
    w = count_window(m.group, settle, window, window_max, lambda: (m.cpu(), all_cpu()))
    dt, (c0, o0), (c1, o1) = w["seconds"], w["before"], w["after"]
    return dict(seconds=dt, round_trips=w["round_trips"], updates_per_s=w["rate"], estimator=w["estimator"],
                server_cores=(c1["server"] - c0["server"]) / dt,
                shard_cores=[(b - a) / dt for a, b in zip(c0["shards"], c1["shards"])],
                pushers_cores=(c1["pushers"] - c0["pushers"]) / dt, machine_busy_cores=(c1["machine"] - c0["machine"]) / dt,
                others_cores=others_seconds(o0, o1) / dt, kernel_threads_cores=others_seconds(o0, o1, kernel=True) / dt)


def summarize(m: Measured, ws: list[dict]) -> dict:
    """Medians over the windows; CPU seconds per update = a window's cores / its updates/s."""
    c = m.group.control
    rate = median([w["updates_per_s"] for w in ws])
    per_update = lambda key: median([w[key] / w["updates_per_s"] for w in ws if w["updates_per_s"] > 0])  # noqa: E731
    out = dict(updates_per_s=rate, windows=ws,
               server_cpu_s_per_update=per_update("server_cores"),
               server_cores=median([w["server_cores"] for w in ws]),
               pushers_cores=median([w["pushers_cores"] for w in ws]),
               pushers_cpu_s_per_update=per_update("pushers_cores"),
               machine_cpu_s_per_update=per_update("machine_busy_cores"),
               machine_busy_cores=median([w["machine_busy_cores"] for w in ws]),
               others_cores=median([w.get("others_cores", float("nan")) for w in ws]),
               others_cores_max=max(w.get("others_cores", float("nan")) for w in ws),
               kernel_threads_cores=median([w.get("kernel_threads_cores", float("nan")) for w in ws]),
               up_bytes_per_update=int(c[0, UP_BYTES]), down_bytes_per_update=int(c[0, DOWN_BYTES]))
    out["up_mb_per_s"] = rate * out["up_bytes_per_update"] / 1e6
    out["down_mb_per_s"] = rate * out["down_bytes_per_update"] / 1e6
    if m.shards > 1:
        out["shard_cpu_s_per_update"] = [
            median([w["shard_cores"][i] / w["updates_per_s"] for w in ws if w["updates_per_s"] > 0])
            for i in range(m.shards)]
        out["shard_cores"] = [median([w["shard_cores"][i] for w in ws]) for i in range(m.shards)]
        out["shards_cpu_s_per_update"] = median(
            [sum(w["shard_cores"]) / w["updates_per_s"] for w in ws if w["updates_per_s"] > 0])
        out["shard_up_bytes_per_update"] = [int(c[0, SHARD_UP + i]) for i in range(m.shards)]
        out["shard_down_bytes_per_update"] = [int(c[0, SHARD_DOWN + i]) for i in range(m.shards)]
        out["shard_up_mb_per_s"] = [rate * b / 1e6 for b in out["shard_up_bytes_per_update"]]
        out["shard_down_mb_per_s"] = [rate * b / 1e6 for b in out["shard_down_bytes_per_update"]]
    return out


def batches(specs: list[tuple[str, int, str, int]], k: int, budget: int) -> list[list[tuple[str, int, str, int]]]:
    """The systems in order, cut into consecutive batches whose estimated memory fits `budget` bytes together (a
    system alone over it gets a batch of its own, and is refused when started if it does not fit then)."""
    out: list[list] = [[]]
    used = 0
    for spec in specs:
        need = estimated_bytes(spec[0], spec[1], spec[3], k)
        if out[-1] and used + need > budget:
            out.append([])
            used = 0
        out[-1].append(spec)
        used += need
    return out


def measure_point(label: str, specs: list[tuple[str, int, str, int]], k: int, reps: int, window: float, settle: float,
                  tmp: Path, log, profile_at: tuple[str, int] | None = None) -> dict:  # noqa: ANN001
    """Every system of `specs` ((name, shards, size, numel)) started, paused; `reps` rounds of one window each, the
    order rotated every round; then all closed (final counts checked) and summarized. Systems that would not fit in
    memory together (estimated_bytes, 0.75 of what is available) are measured in consecutive batches."""
    systems: dict[str, Measured] = {}
    skipped: dict[str, str] = {}
    windows: dict[str, list[dict]] = defaultdict(list)
    memory: dict[str, int] = {}
    finals: dict[str, dict] = {}
    batch_of: dict[str, int] = {}
    profile = None
    t_start = time.monotonic()
    load_begin = os.getloadavg()
    plan = batches(specs, k, int(0.75 * mem_available()))
    for b, batch in enumerate(plan):
        live: dict[str, Measured] = {}
        try:
            for name, shards, size, numel in batch:
                batch_of[name] = b
                need, have = estimated_bytes(name, shards, numel, k), mem_available()
                if need > 0.75 * have:
                    skipped[name] = f"not run: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
                    log(f"  {label} K={k} {name}: {skipped[name]}")
                    continue
                t = time.monotonic()
                try:
                    live[name] = systems[name] = start_system(name, shards, size, numel, k,
                                                              tmp / f"{label}-k{k}-{name.replace('=', '')}")
                except Exception as e:  # noqa: BLE001 - recorded; the other systems still run
                    skipped[name] = f"failed to start: {type(e).__name__}: {str(e)[-600:]}"
                    log(f"  {label} K={k} {name}: {skipped[name]}")
                    continue
                MINE.update(live[name].pids())
                memory[name] = sum(pss_bytes(p) for p in live[name].pids())
                log(f"  {label} K={k} {name}: ready in {time.monotonic() - t:.1f}s, {memory[name] / 2**30:.2f} GiB; "
                    f"{mem_available() / 2**30:.1f} GiB available" + (f" (batch {b + 1} of {len(plan)})"
                                                                      if len(plan) > 1 else ""))
            for rep in range(reps):
                for name in _rotated(list(live), rep):
                    if name in skipped:
                        continue
                    try:
                        windows[name].append(dict(rep=rep, batch=b, **measure_window(live[name], settle, window,
                                                                                     max(10.0, 3 * window))))
                    except Exception as e:  # noqa: BLE001
                        skipped[name] = f"failed while measuring: {type(e).__name__}: {str(e)[-600:]}"
                        log(f"  {label} K={k} {name}: {skipped[name]}")
            if profile_at == (label, k):
                target = next((m for n, m in live.items() if m.shards == 2 and n not in skipped), None)
                if target is not None:
                    profile = profile_system(target, settle, tmp, log)
        finally:
            for name, m in live.items():
                try:
                    finals[name] = m.group.close()
                except Exception as e:  # noqa: BLE001
                    finals[name] = dict(error=f"{type(e).__name__}: {e}")
                MINE.difference_update(m.pids())
    row: dict = dict(k=k, systems={}, seconds=round(time.monotonic() - t_start, 1), batches=len(plan),
                     load_average_begin=[round(x, 2) for x in load_begin],
                     load_average_end=[round(x, 2) for x in os.getloadavg()])
    if profile is not None:
        row["profile"] = profile
    for name, shards, _size, numel in specs:
        entry: dict = dict(shards=shards, numel=numel)
        if windows.get(name):
            entry.update(summarize(systems[name], windows[name]))
        if name in skipped:
            entry["skipped"] = skipped[name]
        if name in memory:
            entry["memory_gib"] = round(memory[name] / 2**30, 2)
        if name in finals:
            entry["final_counts"] = finals[name]
        if len(plan) > 1 and name in batch_of:
            entry["batch"] = batch_of[name] + 1
        row["systems"][name] = entry
    s = row["systems"]
    base = s.get(system_name(1), {}).get("updates_per_s")
    rpc = s.get("torch-rpc", {}).get("updates_per_s")
    for entry in s.values():
        if "updates_per_s" in entry:
            if base:
                entry["over_s1"] = entry["updates_per_s"] / base
            if rpc:
                entry["over_torch_rpc"] = entry["updates_per_s"] / rpc
    log(f"  {label} K={k}: " + "; ".join(f"{n} {v['updates_per_s']:.1f}/s" if "updates_per_s" in v else f"{n} -"
                                         for n, v in s.items()) + f" ({row['seconds']}s)")
    return row


# -- the report ----------------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + " ... (the JSON has the rest)"


def _ms(x: float | None) -> str:
    return fmt(None if x is None else 1e3 * x, ".2f")


def _rate_row(k: int, name: str, v: dict) -> list[str]:
    if "updates_per_s" not in v:
        return [str(k), name, _one_line(v.get("skipped", "not measured"))] + ["-"] * 9
    shards = v.get("shard_cpu_s_per_update")
    per_shard_mb = (" / ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(v["shard_up_mb_per_s"], v["shard_down_mb_per_s"]))
                    if shards else f"{v['up_mb_per_s']:.0f}/{v['down_mb_per_s']:.0f}")
    return [str(k), name, fmt(v["updates_per_s"]), fmt(v.get("over_s1"), ".2f"), fmt(v.get("over_torch_rpc"), ".2f"),
            _ms(v["server_cpu_s_per_update"]),
            " / ".join(_ms(x) for x in shards) if shards else "-",
            _ms(v.get("shards_cpu_s_per_update")) if shards else "-",
            f"{_ms(v.get('pushers_cpu_s_per_update'))}; {_ms(v.get('machine_cpu_s_per_update'))}",
            per_shard_mb,
            f"{v['server_cores']:.2f} + {sum(v.get('shard_cores', [])):.2f} + {v['pushers_cores']:.2f} "
            f"({v['machine_busy_cores']:.2f}; {fmt(v.get('kernel_threads_cores'), '.2f')}; "
            f"{fmt(v.get('others_cores'), '.2f')})",
            fmt(v.get("memory_gib"), ".1f")]


RATE_COLUMNS = ("K", "system", "updates/s", "vs S=1", "vs torch-rpc",
                "CPU ms/update: ps-server (coordinator at S>1; torch-rpc: server rank)",
                "CPU ms/update: each shard", "CPU ms/update: shards together",
                "CPU ms/update: pushers; whole machine",
                "MB/s up/down (per shard)", "cores: server + shards + pushers (machine busy; kernel threads; other users' processes)", "GiB (PSS)")
COORDINATOR_COLUMNS = ("S", "parameters", "pushes/s", "coordinator CPU ms/push", "coordinator cores",
                       "1 / (CPU per push): pushes/s one core could order", "CPU ms/push: each shard",
                       "cores: shards + pushers (machine busy; kernel threads; other users' processes)")


def _coordinator_row(v: dict) -> list[str]:
    if "updates_per_s" not in v:
        return [str(v["shards"]), f"{v['numel']:,}", _one_line(v.get("skipped", "not measured"))] + ["-"] * 5
    cpu = v["server_cpu_s_per_update"]
    shards = v.get("shard_cpu_s_per_update")
    return [str(v["shards"]), f"{v['numel']:,}", fmt(v["updates_per_s"]), _ms(cpu), f"{v['server_cores']:.2f}",
            fmt(1 / cpu if cpu else None, ".0f"), " / ".join(_ms(x) for x in shards) if shards else "-",
            f"{sum(v.get('shard_cores', [])):.2f} + {v['pushers_cores']:.2f} ({v['machine_busy_cores']:.2f}; "
            f"{fmt(v.get('kernel_threads_cores'), '.2f')}; {fmt(v.get('others_cores'), '.2f')})"]


def counts_line(rows: list[dict]) -> str:
    checked = [(r["k"], n, v["final_counts"]) for r in rows for n, v in r["systems"].items() if "final_counts" in v]
    bad = [f"K={k} {n}: {f}" for k, n, f in checked if not f.get("counts_add_up")]
    return (f"Final counts (server's applied updates = pushers' gradients sent = replies): "
            f"{len(checked) - len(bad)} of {len(checked)} groups add up" + (f"; NOT: {'; '.join(bad)}" if bad else "")
            + ".")


def point_notes(rows: list[dict]) -> list[str]:
    """Per (size, K): the load average around it, memory batches, and systems that failed or were not run."""
    out = []
    for r in rows:
        note = (f"- K={r['k']}: {r['seconds']} s; load average (1 min) {r['load_average_begin'][0]} before, "
                f"{r['load_average_end'][0]} after")
        if r.get("batches", 1) > 1:
            note += (f"; measured in {r['batches']} batches to fit in memory (" + ", ".join(
                f"{n}: {v['batch']}" for n, v in r["systems"].items() if "batch" in v)
                     + "): systems of one batch alternate windows, batches follow each other")
        out.append(note + ".")
        for n, v in r["systems"].items():
            if v.get("skipped"):
                out.append(f"  - {n}: {_one_line(v['skipped'], 400)}" + (
                    " (its row: the windows before that)" if "updates_per_s" in v else ""))
    return out


def _profile(prof: dict) -> list[str]:
    lines = [f"## Where a shard's time goes: py-spy on {prof['system']} at {prof['numel']:,} parameters, "
             f"K={prof['k']}", "",
             "Shard 0 and the coordinator while the pushers push (bench/throughput/profile.py: Python frames with "
             "`--nonblocking`, C time charged to the Python line that called it; native frames pause the process for "
             "each sample). % of all samples over all threads.", ""]
    for who, p in prof.items():
        if not isinstance(p, dict):
            continue
        if "error" in p:
            lines += [f"{who}: not profiled: {p['error']}", ""]
            continue
        lines += [f"**{who} frames** ({p.get('samples', 0)} samples):", "",
                  harness.table(("top by self time", "%", "top by total time", "%"),
                                ([f"`{a[0]}`", a[1], f"`{b[0]}`", b[1]] for a, b in zip(p["self"], p["total"]))),
                  "", "Files by total time: " + ", ".join(f"`{n}` {v}%" for n, v in p["files"]) + ".", ""]
    return lines


def markdown(result: dict) -> list[str]:
    meta = result["meta"]
    code = meta["git_begin"]["server_code_modified"]
    lines = [TITLE, "", *harness.meta_lines(meta),
             f"Memory: {meta['memory_gib']} GiB. Load average (1, 5, 15 min): {meta['load_average_begin']} at the "
             f"start, {meta['load_average_end']} at the end.  ",
             *([f"Code: server/common modified in the working tree: {', '.join(code)}.  "] if code else []),
             *([f"Code CHANGED during the run: {meta['git_end']}.  "] if meta["git_begin"] != meta["git_end"] else []),
             f"Python {meta['python']}; torch {meta['torch']}; grpcio {meta['grpc']}; numpy {meta['numpy']}.", "",
             harness.prose("sharded_method", cpus=meta["cpus"], settle_s=meta["settle_s"]), ""]
    for size in result["sizes"]:
        lines += [f"## {size['size']}: {size['numel']:,} parameters ({size['numel'] * 4 / 1e6:.1f} MB per tensor)", "",
                  f"K = {', '.join(map(str, size['ks']))}; {size['reps']} windows of at least {size['window_s']} s per "
                  "system, medians.", "",
                  harness.table(RATE_COLUMNS, (_rate_row(r["k"], n, v) for r in size["rows"]
                                               for n, v in r["systems"].items())), "", counts_line(size["rows"]), "",
                  *point_notes(size["rows"]), ""]
    coord = result.get("coordinator")
    if coord:
        lines += [f"## The coordinator's own cost: flat models of S x {SLICE_ALIGN} parameters, K={coord['k']}", "",
                  f"{coord['reps']} windows of at least {coord['window_s']} s per system, medians. At S=1 the "
                  "'coordinator' is the whole one-process server (it applies the updates too).", "",
                  harness.table(COORDINATOR_COLUMNS, (_coordinator_row(v) for v in coord["row"]["systems"].values())),
                  "", counts_line([coord["row"]]), "", *point_notes([coord["row"]]), ""]
    profiles = [r["profile"] for size in result["sizes"] for r in size["rows"] if r.get("profile")]
    for prof in profiles:
        lines += _profile(prof)
    if result.get("missing"):
        lines += ["## Not measured", ""] + [f"- {m}" for m in result["missing"]] + [""]
    reading = harness.prose("sharded_reading") if (harness.PROSE / "sharded_reading.md").exists() else ""
    if reading and not meta.get("quick"):
        lines += [reading.rstrip(), ""]
    return lines


# -- the command ---------------------------------------------------------------------------------------------------
def git_state() -> dict:
    return dict(head=harness.git("rev-parse", "--short", "HEAD"),
                server_code_modified=harness.git("status", "--porcelain", "--", "server", "common", "worker",
                                                 "proto").splitlines())


def parse_args(argv: list[str] | None):  # noqa: ANN201
    p = harness.parser("sharded", __doc__)
    p.add_argument("--quick", action="store_true", help="ResNet20, K=4, S=1,2, no torch-rpc, no coordinator part")
    p.add_argument("--sizes", default=None, help=f"comma-separated subset of {', '.join(SIZES)}")
    p.add_argument("--ks", default=None, help="comma-separated K for every size (default: per size)")
    p.add_argument("--shards", default=None, help="comma-separated S values (default: 1,2,4; 1,2 with --quick)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--settle", type=float, default=0.3)
    p.add_argument("--torch-rpc", choices=("yes", "no"), default=None, help="the baseline (default: yes; no with --quick)")
    p.add_argument("--coordinator", choices=("yes", "no"), default=None,
                   help="the coordinator's own cost at S x 1024 parameters (default: yes; no with --quick)")
    p.add_argument("--redraw", action="store_true", help="only write OUT.md again from OUT.json")
    p.add_argument("--profile", choices=("yes", "no"), default=None,
                   help="py-spy S=2's shard 0 and coordinator at resnet20 K=4 (default: yes, no with --quick; "
                        "needs py-spy on PATH or beside python)")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (default: bench/results/sharded, runs/bench/sharded_quick)")
    args = p.parse_args(argv)
    args.plan = dict(QUICK_PLAN if args.quick else FULL_PLAN)
    if args.sizes:
        unknown = [s for s in args.sizes.split(",") if s not in SIZES]
        if unknown:
            p.error(f"unknown sizes {unknown}")
        args.plan = {s: args.plan.get(s, FULL_PLAN[s]) for s in args.sizes.split(",")}
    args.shards = tuple(int(s) for s in args.shards.split(",")) if args.shards else (
        QUICK_SHARDS if args.quick else FULL_SHARDS)
    if any(not 1 <= s <= MAX_SHARDS for s in args.shards):
        p.error(f"S must be 1..{MAX_SHARDS}")
    args.torch_rpc = (args.torch_rpc or ("no" if args.quick else "yes")) == "yes"
    args.coordinator = (args.coordinator or ("no" if args.quick else "yes")) == "yes"
    args.profile_at = PROFILE_AT if (args.profile or ("no" if args.quick else "yes")) == "yes" else None
    args.out = args.out or (harness.REPO / "runs" / "bench" / "sharded_quick" if args.quick
                            else harness.RESULTS / "sharded")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.redraw:  # the Markdown again from the JSON (after the hand-written reading changed)
        result = json.loads(args.out.with_suffix(".json").read_text())
        harness.write_markdown(args.out.with_suffix(".md"), markdown(result))
        return result
    t_begin = time.monotonic()
    load_begin = os.getloadavg()
    git_begin = git_state()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", file=sys.stderr, flush=True)

    import grpc
    import numpy as np
    import torch

    sizes, missing = [], []
    coordinator = None
    with tempfile.TemporaryDirectory(prefix="ps-sharded-") as tmp:
        for size, (ks, reps, window) in args.plan.items():
            ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else ks
            reps, window = args.reps or reps, args.window or window
            log(f"{size} ({SIZES[size]:,} parameters): K={ks}, S={args.shards}, {reps} windows of {window}s")
            specs = [(system_name(s), s, size, SIZES[size]) for s in args.shards]
            if args.torch_rpc:
                specs.append(("torch-rpc", 1, size, SIZES[size]))
            rows = [measure_point(size, specs, k, reps, window, args.settle, Path(tmp), log, args.profile_at)
                    for k in ks]
            sizes.append(dict(size=size, numel=SIZES[size], ks=list(ks), reps=reps, window_s=window, rows=rows))
        if args.coordinator:
            reps, window = args.reps or COORDINATOR_REPS, args.window or COORDINATOR_WINDOW
            log(f"coordinator: flat S x {SLICE_ALIGN} parameters, K={COORDINATOR_K}, S={args.shards}")
            specs = [(system_name(s), s, f"flat{s * SLICE_ALIGN}", s * SLICE_ALIGN) for s in args.shards]
            row = measure_point("coordinator", specs, COORDINATOR_K, reps, window, args.settle, Path(tmp), log)
            coordinator = dict(k=COORDINATOR_K, reps=reps, window_s=window, row=row)
    if not args.quick and "25M" in args.plan and not args.ks:
        missing.append("25M with K=16: not run by plan (16 pushers hold ~3.5 GB per group and four groups live at "
                       "once on 24 GiB; a 25M round trip takes ~1 s here, so windows would need ~10 s each).")
    meta = harness.run_meta("sharded", argv) | dict(
        quick=args.quick, memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        python=platform.python_version(), torch=torch.__version__, grpc=grpc.__version__, numpy=np.__version__,
        git_begin=git_begin, git_end=git_state(),
        load_average_begin=[round(x, 2) for x in load_begin], load_average_end=[round(x, 2) for x in os.getloadavg()],
        shards=list(args.shards), torch_rpc=args.torch_rpc, settle_s=args.settle,
        seconds=time.monotonic() - t_begin)
    result = dict(meta=meta, sizes=sizes, coordinator=coordinator, missing=missing)
    written = harness.save(args.out, result, markdown(result))
    log(f"wrote {written} and .json")
    return result


if __name__ == "__main__":
    main()
