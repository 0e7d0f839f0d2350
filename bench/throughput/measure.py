"""Measuring one K: every system's group started and paused, then alternating windows, medians of the rates."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.grad_pusher import DOWN_BYTES, UP_BYTES
from bench.throughput.groups import Group, start_group
from bench.throughput.plan import GOAL_ECHO_FRACTION, GOAL_K, GOAL_SIZE
from bench.throughput.profile import profile_server


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimated_bytes(system: str, numel: int, k: int) -> int:
    """Rough peak memory of a group: a few message-sized copies per process plus the interpreter."""
    msg = 4 * numel
    if system.startswith("torch-rpc"):  # forked ranks share torch's pages
        return (k + 1) * (3 * msg + (60 << 20)) + (300 << 20)
    return k * (4 * msg + (60 << 20)) + 8 * msg + (400 << 20)


def _wait(group: Group, until, at_least: float, at_most: float) -> None:  # noqa: ANN001
    """Sleep at least `at_least` seconds, then until `until()` holds or `at_most` seconds passed."""
    start = time.monotonic()
    time.sleep(at_least)
    while not until() and time.monotonic() - start < at_most:
        if group.failures():
            raise RuntimeError(f"{group.system}: {group.failures()}")
        time.sleep(0.005)
    if group.failures():
        raise RuntimeError(f"{group.system}: {group.failures()}")


def count_window(group: Group, settle: float, window: float, window_max: float, sample: Callable[[], Any]) -> dict:
    """One window: resume, settle, count replies, pause. Rates are per pusher, from the replies' own times.

    Settle: at least `settle` seconds and until every pusher had a reply since it resumed (so the window
    starts from a reply, not from the pause). Window: at least `window` seconds and until every pusher
    had a reply in it (at most `window_max`). A pusher's rate is its replies in the window over the time
    from its last reply before the window to its last reply in it: exact for a closed loop, with no
    rounding to whole round trips per window (which matters at 1-3 round trips per second). The sum
    over pushers is the system's rate; if some pusher had no reply in `window_max`, the window falls
    back to (replies in the window) / (window length). `sample()` is read at the window's two edges (CPU
    counters): its readings come back as `before` and `after`.
    """
    group.resume()
    try:
        n_resumed, _ = group.snapshot()
        _wait(group, lambda: (group.snapshot()[0] > n_resumed).all(), settle, window_max)
        n0, ns0 = group.snapshot()
        before, t0 = sample(), time.perf_counter()
        _wait(group, lambda: (group.snapshot()[0] > n0).all(), window, window_max)
        n1, ns1 = group.snapshot()
        after, t1 = sample(), time.perf_counter()
    finally:
        group.pause()
    dt = t1 - t0
    dn = n1 - n0
    if (dn >= 1).all():
        rate = float(sum(dn[i] / ((ns1[i] - ns0[i]) / 1e9) for i in range(group.k)))
        estimator = "per-pusher reply times"
    else:
        rate, estimator = float(dn.sum() / dt), "count over the window"
    return dict(seconds=dt, round_trips=int(dn.sum()), rate=rate, estimator=estimator, before=before, after=after)


def measure_window(group: Group, settle: float, window: float, window_max: float) -> dict:
    """One window (`count_window`) with the server's, the pushers' and the machine's CPU."""
    w = count_window(group, settle, window, window_max, group.cpu)
    dt, c0, c1 = w["seconds"], w["before"], w["after"]
    return dict(seconds=dt, round_trips=w["round_trips"], round_trips_per_s=w["rate"], estimator=w["estimator"],
                server_cpu_cores=(c1[0] - c0[0]) / dt, pushers_cpu_cores=(c1[1] - c0[1]) / dt,
                server_main_thread_cores=(c1[2] - c0[2]) / dt, machine_busy_cores=(c1[3] - c0[3]) / dt)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _rotated(order: list[str], rep: int) -> list[str]:
    if not order:
        return []
    r = rep % len(order)
    return order[r:] + order[:r]


def summarize_k(k: int, systems: tuple[str, ...], groups: dict[str, Group], windows: dict[str, list[dict]],
                skipped: dict[str, str]) -> dict:
    row: dict = dict(k=k, systems={})
    for system in systems:
        ws = windows.get(system, [])
        if not ws:
            row["systems"][system] = dict(skipped=skipped.get(system, "not measured"))
            continue
        g = groups[system]
        up, down = int(g.control[0, UP_BYTES]), int(g.control[0, DOWN_BYTES])
        rts = median([w["round_trips_per_s"] for w in ws])
        # Every reply of ps-server and torch-rpc follows exactly one applied update (asynchronous rules: the
        # worker's own gradient is applied, then it gets the parameters), so replies/s = updates/s; the
        # servers' own counters are checked against the pushers' at the end (final_counts).
        row["systems"][system] = dict(
            updates_per_s=rts, round_trips_per_s=rts,
            up_bytes_per_msg=up, down_bytes_per_msg=down, up_mb_per_s=rts * up / 1e6, down_mb_per_s=rts * down / 1e6,
            server_cpu_cores=median([w["server_cpu_cores"] for w in ws]),
            pushers_cpu_cores=median([w["pushers_cpu_cores"] for w in ws]),
            server_main_thread_cores=median([w["server_main_thread_cores"] for w in ws]),
            machine_busy_cores=median([w["machine_busy_cores"] for w in ws]), windows=ws)
        if system in skipped:
            row["systems"][system]["note"] = skipped[system]
    s = row["systems"]
    if "updates_per_s" in s.get("server", {}):
        if "round_trips_per_s" in s.get("echo", {}):
            row["server_over_echo"] = s["server"]["updates_per_s"] / s["echo"]["round_trips_per_s"]
        if "updates_per_s" in s.get("torch-rpc", {}):
            row["server_over_torch_rpc"] = s["server"]["updates_per_s"] / s["torch-rpc"]["updates_per_s"]
    return row


def measure_k(size: str, numel: int, k: int, reps: int, window: float, settle: float, systems: tuple[str, ...],
              tmp: Path, profile: str, log, server_env: dict[str, str] | None = None,  # noqa: ANN001
              chunk_mib: float | None = None, profile_at: tuple[str, int] = (GOAL_SIZE, GOAL_K)
              ) -> tuple[dict, dict | None]:
    groups: dict[str, Group] = {}
    skipped: dict[str, str] = {}
    windows: dict[str, list[dict]] = defaultdict(list)
    profile_result = None
    finals: dict[str, dict] = {}
    t_start = time.monotonic()
    try:
        for system in systems:
            need, have = estimated_bytes(system, numel, k), mem_available()
            if need > 0.6 * have:
                skipped[system] = f"not run: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
                log(f"  {size} K={k} {system}: {skipped[system]}")
                continue
            t = time.monotonic()
            try:
                groups[system] = start_group(system, size, numel, k, tmp / f"{size}-k{k}-{system}",
                                             server_env=server_env, chunk_mib=chunk_mib)
            except Exception as e:  # noqa: BLE001 - recorded in the results; the other systems still run
                skipped[system] = f"failed to start: {type(e).__name__}: {str(e)[-600:]}"
                log(f"  {size} K={k} {system}: {skipped[system]}")
                continue
            groups[system].pause()
            log(f"  {size} K={k} {system}: {k} pushers ready in {time.monotonic() - t:.1f}s")
        order = list(groups)
        for rep in range(reps):
            for system in _rotated(order, rep):
                if system in skipped:
                    continue
                try:
                    w = measure_window(groups[system], settle, window, max(10.0, 3 * window))
                except Exception as e:  # noqa: BLE001
                    skipped[system] = f"failed while measuring: {type(e).__name__}: {str(e)[-600:]}"
                    log(f"  {size} K={k} {system}: {skipped[system]}")
                    continue
                windows[system].append(dict(rep=rep, **w))
        row = summarize_k(k, systems, groups, windows, skipped)
        missed = (row.get("server_over_echo", 1.0) < GOAL_ECHO_FRACTION
                  or row.get("server_over_torch_rpc", 2.0) <= 1.0)
        at_goal = (size, k) == profile_at
        if "server" in groups and "server" not in skipped and (
                profile == "always" and at_goal or profile == "auto" and at_goal and missed):
            profile_result = profile_server(groups["server"], settle, tmp, log, size=size)
    finally:
        for system, g in groups.items():
            try:
                finals[system] = g.close()
            except Exception as e:  # noqa: BLE001
                finals[system] = dict(error=f"{type(e).__name__}: {e}")
    for system, final in finals.items():
        row["systems"][system]["final_counts"] = final
    row["seconds"] = round(time.monotonic() - t_start, 1)
    log(f"  {size} K={k}: " + "; ".join(
        f"{name} {v['updates_per_s']:.1f}/s" if "updates_per_s" in v else f"{name} -"
        for name, v in row["systems"].items())
        + (f"; server/echo {row['server_over_echo']:.2f}" if "server_over_echo" in row else "")
        + (f"; server/torch-rpc {row['server_over_torch_rpc']:.2f}" if "server_over_torch_rpc" in row else "")
        + f" ({row['seconds']}s)")
    return row, profile_result
