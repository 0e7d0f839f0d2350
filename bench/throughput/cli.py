"""`python -m bench.throughput`: the plan from the flags, every (size, K) measured, the results written."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import bench.throughput
from bench import harness
from bench.throughput.measure import measure_k
from bench.throughput.plan import FULL_PLAN, GOAL_K, GOAL_SIZE, QUICK_PLAN, RESNET20_NUMEL, SIZE_NOTES, SIZES, SYSTEMS
from bench.throughput.report import fmt, goals, markdown, notes


def git_state() -> dict:
    """The commit measured and whether the server's code differs from it (other people edit the tree)."""
    return dict(head=harness.git("rev-parse", "--short", "HEAD"),
                server_code_modified=harness.git("status", "--porcelain", "--", "server", "common").splitlines())


def parse_args(argv: list[str] | None):  # noqa: ANN201
    p = harness.parser("throughput", bench.throughput.__doc__)
    p.add_argument("--quick", action="store_true", help="ResNet20 only, K=16, shorter windows (~1 min)")
    p.add_argument("--sizes", default=None, help=f"comma-separated subset of {', '.join(SIZES)}")
    p.add_argument("--ks", default=None, help="comma-separated K values for every size (default: per size)")
    p.add_argument("--reps", type=int, default=None, help="windows per system (default: per size)")
    p.add_argument("--window", type=float, default=None, help="seconds per window (default: per size)")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds after resuming before a window (and until every pusher had a reply)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--profile", choices=("auto", "always", "never"), default=None,
                   help=f"py-spy the server at {GOAL_SIZE} K={GOAL_K}: when a goal is missed (auto, the default), "
                        "always, never (the default with --quick)")
    p.add_argument("--profile-at", default=f"{GOAL_SIZE}:{GOAL_K}", metavar="SIZE:K",
                   help="the (size, K) point --profile applies to")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the ps-server process only (diagnostics, e.g. OMP_NUM_THREADS=1)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="ps-server's and the echo's --chunk-mib (default: theirs); 0 sends every tensor whole")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (default: bench/results/throughput, "
                        "runs/bench/throughput_quick with --quick)")
    args = p.parse_args(argv)
    args.plan = dict(QUICK_PLAN if args.quick else FULL_PLAN)
    if args.sizes:
        wanted = args.sizes.split(",")
        unknown = [s for s in wanted if s not in SIZES]
        if unknown:
            p.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
        args.plan = {s: args.plan.get(s, FULL_PLAN[s]) for s in wanted}
    args.systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    args.profile = args.profile or ("never" if args.quick else "auto")
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    size, _, k = args.profile_at.partition(":")
    if size not in SIZES or not k.isdigit():
        p.error(f"--profile-at must be SIZE:K with SIZE one of {list(SIZES)}, got {args.profile_at!r}")
    args.profile_at = (size, int(k))
    args.out = args.out or (harness.REPO / "runs" / "bench" / "throughput_quick" if args.quick
                            else harness.RESULTS / "throughput")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    systems = args.systems
    t_begin = time.monotonic()
    load_begin = os.getloadavg()
    git_begin = git_state()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", file=sys.stderr, flush=True)

    import grpc
    import numpy as np
    import torch

    from ormo_ps.common.models import build_model, count_parameters

    assert count_parameters(build_model("resnet20", 10, (3, 8, 8))) == RESNET20_NUMEL
    run_notes = []
    try:
        import torch.distributed.rpc as rpc

        rpc_ok = rpc.is_available()
    except ImportError:
        rpc_ok = False
    if "torch-rpc" in systems and not rpc_ok:
        systems = tuple(s for s in systems if s != "torch-rpc")
        run_notes.append("torch.distributed.rpc is not available in this torch build: the torch-rpc baseline was "
                         "skipped.")
    sizes = []
    profile_result = None
    with tempfile.TemporaryDirectory(prefix="ps-throughput-") as tmp:
        for size, (ks, reps, window) in args.plan.items():
            ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else ks
            reps, window = args.reps or reps, args.window or window
            log(f"{size} ({SIZES[size]:,} parameters): K={ks}, {reps} windows of {window}s per system")
            rows = []
            for k in ks:
                row, prof = measure_k(size, SIZES[size], k, reps, window, args.settle, systems, Path(tmp), args.profile,
                                      log, args.server_env, args.chunk_mib, args.profile_at)
                rows.append(row)
                profile_result = prof or profile_result
            sizes.append(dict(size=size, numel=SIZES[size], note=SIZE_NOTES[size], ks=list(ks), reps=reps,
                              window_s=window, rows=rows))
    meta = harness.run_meta("throughput", argv) | dict(
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        python=platform.python_version(), torch=torch.__version__, grpc=grpc.__version__, numpy=np.__version__,
        git_begin=git_begin, git_end=git_state(),
        load_average_begin=[round(x, 2) for x in load_begin],
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        systems=list(systems), server_env=args.server_env, chunk_mib=args.chunk_mib, reps=args.reps or "per size",
        window_s=f"{args.window} s" if args.window else "the size's seconds", settle_s=args.settle,
        seconds=time.monotonic() - t_begin)
    out = args.out
    for mode, prof in (profile_result or {}).items():
        if isinstance(prof, dict) and "_collapsed" in prof:
            stacks = out.with_name(f"{out.name}_server_profile_{mode}.txt")
            stacks.parent.mkdir(parents=True, exist_ok=True)
            stacks.write_text(prof.pop("_collapsed"))
            prof["collapsed_stacks"] = stacks.name
    result = dict(meta=meta, sizes=sizes, goals=goals(sizes), profile=profile_result, notes=run_notes + notes())
    written = harness.save(out, result, markdown(result))
    log(f"wrote {written} and .json")
    for g in result["goals"]:
        log(f"goal {g['verdict']}: {g['goal']} (ratio {fmt(g['value'], '.2f')})")
    return result
