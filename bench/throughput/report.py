"""The throughput report: the goals' verdicts and the Markdown generated from a run's results.

Tables and numbers come from the results; the text that explains the method and the notes are written
by hand in bench/prose/throughput_method.md and bench/prose/throughput_notes.md.
"""

from __future__ import annotations

from bench import harness
from bench.throughput.plan import GOAL_ECHO_FRACTION, GOAL_K, GOAL_SIZE
from bench.throughput.profile import MODES

TITLE = "# Throughput: ps-server vs the gRPC echo ceiling vs a torch.distributed.rpc parameter server"
COLUMNS = ("K", "server updates/s", "echo round trips/s", "torch-rpc updates/s", "server / echo", "server / torch-rpc",
           "server MB/s up / down", "echo MB/s up / down", "torch-rpc MB/s up / down",
           "CPU cores, server process + pushers: server / echo / torch-rpc")


def _columns(size: dict) -> tuple[str, ...]:
    measured = any("machine_busy_cores" in v for r in size["rows"] for v in r["systems"].values())
    if not measured:  # results from before the main thread and the whole machine were measured
        return COLUMNS
    return (*COLUMNS[:-1], "CPU cores, server process + pushers (server's main thread; whole machine busy): "
                           "server / echo / torch-rpc")


def notes() -> list[str]:
    """The hand-written notes (bench/prose/throughput_notes.md), one string per item of its list."""
    return [line[2:].strip() for line in harness.prose("throughput_notes").splitlines() if line.startswith("- ")]


def goals(sizes: list[dict]) -> list[dict]:
    out = []
    rows = {(s["size"], r["k"]): r for s in sizes for r in s["rows"]}
    goal = rows.get((GOAL_SIZE, GOAL_K))
    ratio = goal.get("server_over_echo") if goal else None
    out.append(dict(goal=f"at K={GOAL_K} with ResNet20 the server applies at least {GOAL_ECHO_FRACTION:.0%} of the "
                         "echo ceiling's round trips",
                    value=ratio, verdict="not measured" if ratio is None else
                    ("met" if ratio >= GOAL_ECHO_FRACTION else "missed")))
    ratio = goal.get("server_over_torch_rpc") if goal else None
    everywhere = [r["server_over_torch_rpc"] for r in rows.values() if "server_over_torch_rpc" in r]
    out.append(dict(goal=f"it beats the PyTorch RPC server (at K={GOAL_K} with ResNet20)", value=ratio,
                    verdict="not measured" if ratio is None else ("met" if ratio > 1.0 else "missed"),
                    elsewhere=f"server faster at {sum(x > 1 for x in everywhere)} of {len(everywhere)} "
                              "(size, K) points measured"))
    return out


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _header(meta: dict) -> list[str]:
    begin, end = meta["git_begin"], meta["git_end"]
    code = []
    if begin["server_code_modified"]:
        code.append(f"server/common modified in the working tree: {', '.join(begin['server_code_modified'])}")
    if begin != end:
        code.append(f"CHANGED during the run, to {end['head']} {end['server_code_modified']}")
    return [
        *harness.meta_lines(meta),
        f"Memory: {meta['memory_gib']} GiB; the machine is shared with other jobs at times: load average "
        f"(1, 5, 15 min) {meta['load_average_begin']} at the start, {meta['load_average_end']} at the end.  ",
        *([f"Code: {'; '.join(code)}.  "] if code else []),
        f"Python {meta['python']}; torch {meta['torch']}; grpcio {meta['grpc']}; numpy {meta['numpy']}."
        + (f"  \nps-server environment: {', '.join(f'{k}={v}' for k, v in meta['server_env'].items())}."
           if meta.get("server_env") else ""),
        "Chunking (ps-server and echo alike): " + (
            "their default `--chunk-mib` (tensors above 4 MiB in 4 MiB pieces; ResNet20's 1.1 MB go whole)."
            if meta.get("chunk_mib") is None else
            "off (`--chunk-mib 0`: every tensor whole)." if meta["chunk_mib"] == 0 else
            f"`--chunk-mib {meta['chunk_mib']:g}`."),
    ]


def _row(r: dict) -> list[str]:
    s = r["systems"]

    def rate(name: str, key: str) -> str:
        v = s.get(name, {})
        return fmt(v.get(key)) if key in v else "not run"

    def mbs(name: str) -> str:
        v = s.get(name, {})
        return f"{v['up_mb_per_s']:.0f} / {v['down_mb_per_s']:.0f}" if "up_mb_per_s" in v else "-"

    def cpu(name: str) -> str:
        v = s.get(name, {})
        if "server_cpu_cores" not in v:
            return "-"
        cores = f"{v['server_cpu_cores']:.2f}+{v['pushers_cpu_cores']:.2f}"
        if "machine_busy_cores" in v:  # results since the main thread and the machine were measured too
            main = f"{v['server_main_thread_cores']:.2f}; " if name != "torch-rpc" else ""
            cores += f" ({main}{v['machine_busy_cores']:.2f})"
        return cores

    return [str(r["k"]), rate("server", "updates_per_s"), rate("echo", "round_trips_per_s"),
            rate("torch-rpc", "updates_per_s"), fmt(r.get("server_over_echo"), ".2f"),
            fmt(r.get("server_over_torch_rpc"), ".2f"), mbs("server"), mbs("echo"), mbs("torch-rpc"),
            f"{cpu('server')} / {cpu('echo')} / {cpu('torch-rpc')}"]


def _size(size: dict) -> list[str]:
    lines = [f"## {size['size']}: {size['numel']:,} parameters ({size['numel'] * 4 / 1e6:.1f} MB per tensor)", "",
             f"{size['note']}. K = {', '.join(map(str, size['ks']))}; windows of at least {size['window_s']} s, "
             f"{size['reps']} per system.", "",
             harness.table(_columns(size), (_row(r) for r in size["rows"]))]
    skipped = [f"K={r['k']} {name}: {v.get('skipped') or v.get('note')}" for r in size["rows"]
               for name, v in r["systems"].items() if v.get("skipped") or v.get("note")]
    if skipped:
        lines += [""] + [f"- {n}" for n in skipped]
    return lines + [""]


def _profile(prof: dict) -> list[str]:
    lines = [f"## Profile of the server at {prof['size']} K={prof['k']}", ""]
    for mode, (_, how) in MODES.items():
        p = prof.get(mode)
        if not p:
            continue
        if "error" in p:
            lines += [f"{mode}: not profiled: {p['error']}", ""]
            continue
        lines += [f"**{mode.capitalize()} frames** (py-spy {how}; {p['seconds']} s, {p['samples']} samples over "
                  f"all threads, {p['updates_per_s_while_profiled']:.0f} updates/s meanwhile, server process "
                  f"{p['server_cpu_cores']:.2f} cores, pushers {p['pushers_cpu_cores']:.2f} cores; % of all "
                  f"samples; stacks in [{p.get('collapsed_stacks')}]({p.get('collapsed_stacks')})). "
                  "Samples by thread: " + ", ".join(f"{n} {v}%" for n, v in p["threads"]) + ".", "",
                  harness.table(("top functions by self time", "%", "top functions by total time", "%"),
                                ([f"`{a[0]}`", a[1], f"`{b[0]}`", b[1]] for a, b in zip(p["self"], p["total"]))),
                  "", "Files by total time: " + ", ".join(f"`{n}` {v}%" for n, v in p["files"]) + ".", ""]
    return lines


def markdown(result: dict) -> list[str]:
    meta = result["meta"]
    lines = [TITLE, "", *_header(meta), "",
             harness.prose("throughput_method", window_s=meta["window_s"], settle_s=meta["settle_s"],
                           cpus=meta["cpus"]), ""]
    for size in result["sizes"]:
        lines += _size(size)
    lines += ["## Goals", ""]
    for g in result["goals"]:
        lines.append(f"- **{g['verdict'].upper()}**: {g['goal']}: ratio {fmt(g['value'], '.2f')}"
                     + (f" ({g['elsewhere']})" if g.get("elsewhere") else "") + ".")
    if result.get("profile"):
        lines += [""] + _profile(result["profile"])
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return lines
