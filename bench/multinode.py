"""What the network does to a run: the project's Slurm batch script on a 3-node cluster of network namespaces
(tests/slurm_cluster.py), under three link profiles, against the same job on one node.

    python -m bench.multinode                   # needs root; installs slurm-wlm and munge when missing
    python -m bench.multinode --quick           # the digits jobs only

For each job (the embedded digits/MLP job and ResNet20 on CIFAR-10, K = 8 and 16) and each placement (one
node: server, evaluator and workers on node1; three nodes with links unshaped, `datacenter` and
`cross-site`, see slurm_cluster.PROFILES), one run of a fixed number of iterations: whether it finished,
its final test accuracy, the updates/s between its first and last progress record (start-up excluded), and
its mean and largest staleness. Results: bench/results/multinode.{md,json}. All nodes share this machine's
cores, so the one-node and three-node runs compete for the same CPUs: the differences are the network's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from ormo_ps.common.metrics import read_metrics
from tests.slurm_cluster import PROFILES, Cluster, install, unavailable

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "ormo-ps.sbatch"
RESULTS = ROOT / "bench" / "results"
PLACEMENTS = ["one node", *PROFILES]


def sharded_jobs(data_dir: str, quick: bool) -> list[dict]:
    """The same jobs with a sharded server: S=2 shards on node2 and node3 (the workers' nodes), the coordinator
    on node1; each profile then shapes the shards' links too."""
    found = []
    for spec in jobs(data_dir, quick):
        if spec["K"] == 8:  # side by side: one server, then 2 shards, under the same profile
            found += [spec | {"job": f"{spec['job']}, 1 server"},
                      spec | {"job": f"{spec['job']}, 2 shards", "settings": spec["settings"] | {"PS_SHARDS": "2"}}]
    return found


def jobs(data_dir: str, quick: bool) -> list[dict]:
    # OrMo-DA: workers that start late on shared cores bring gradients hundreds of iterations stale (seen: 596),
    # which OrMo at the digits job's eta diverges on at K=16; the delay-adaptive rate takes them.
    digits = {"PS_DATASET": "digits", "PS_MODEL": "mlp", "PS_ITERATIONS": "2000", "PS_ALGO": "ormo-da", "PS_LR": "0.02"}
    resnet = {"PS_DATASET": "cifar10", "PS_MODEL": "resnet20", "PS_DATA_DIR": data_dir, "PS_ITERATIONS": "200", "PS_ALGO": "ormo-da",
              "PS_LR": "0.01", "PS_EVAL_EVERY": "0"}  # the tuned eta of bench/results/paper_table at K=16
    found = [("digits/MLP", k, digits) for k in (8, 16)]
    if not quick:
        found += [("ResNet20/CIFAR-10", k, resnet) for k in (8, 16)]
    return [{"job": name, "K": k, "settings": settings | {"PS_WORKERS": str(k)}} for name, k, settings in found]


def measure(cluster: Cluster, out: Path, settings: dict[str, str], nodes: int, timeout: float) -> dict:
    variables = {"PS_OUT": str(out), "PS_LINGER": "5", "PS_LOG_EVERY": "50", "ORMO_PS_PYTHON": sys.executable,
                 "PYTHONPATH": str(ROOT), "PS_THREADS": "1", **settings}
    started = time.monotonic()
    job = cluster.submit(SBATCH, variables, f"--nodes={nodes}")
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    wall = time.monotonic() - started
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    progress = [r for r in records if r["event"] == "progress"]
    summary = next((r for r in reversed(records) if r["event"] == "summary"), {})
    evals = [r for r in records if r["event"] == "eval"]
    rate = None
    if len(progress) >= 2 and progress[-1]["time"] > progress[0]["time"]:
        rate = (progress[-1]["iteration"] - progress[0]["iteration"]) / (progress[-1]["time"] - progress[0]["time"])
    return {"state": info.get("JobState"), "exit": info.get("ExitCode"), "nodes": info.get("NodeList"),
            "iterations": summary.get("iterations"), "finished": bool(summary) and info.get("JobState") == "COMPLETED",
            "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
            "updates_per_second": rate, "staleness_mean": summary.get("staleness_mean"),
            "staleness_max": summary.get("staleness_max"), "job_seconds": round(wall, 1)}


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write(rows: list[dict], meta: dict, name: str = "multinode") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    title = ("Across machines, sharded: the server's 2 shards on the two worker nodes, its coordinator on the first"
             if name != "multinode" else "Across machines: a Slurm job on 3 nodes under each network profile, against one node")
    lines = [f"# {title}", "",
             f"`python -m bench.multinode` on {meta['machine']} ({meta['cores']} cores), commit {meta['commit']}, "
             f"{meta['date']}. Nodes are network namespaces of this machine on one bridge "
             "(tests/slurm_cluster.py); every node shares its cores. Profiles, on each node's link (one way, so a "
             "node-to-node round trip is twice the delay), and what this machine's kernel let be applied: "
             + "; ".join(f"`{k}`: {v.describe()} (applied: {meta['applied'].get(k, '-')})" for k, v in PROFILES.items())
             + ". Placement \"one node\": server, evaluator and the K workers on node1 (traffic on its own "
             "address, unshaped).", "",
             "| job | K | placement | finished | iterations | test accuracy | updates/s | staleness mean | max | job s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['K']} | {r['placement']} | {'yes' if r['finished'] else 'NO (' + str(r['state']) + ')'} "
                     f"| {fmt(r['iterations'], 'd')} | {fmt(r['test_accuracy'], '.4f')} "
                     f"| {fmt(r['updates_per_second'], '.1f')} | {fmt(r['staleness_mean'], '.2f')} "
                     f"| {fmt(r['staleness_max'], 'd')} | {r['job_seconds']:.0f} |")
    path = RESULTS / f"{name}.md"
    kept = ""
    if path.exists():  # sections written by hand after the table (the Faults) stay
        text = path.read_text()
        kept = text[text.index("\n## "):] if "\n## " in text else ""
    path.write_text("\n".join(lines) + "\n" + kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the digits jobs only")
    parser.add_argument("--data-dir", default="/tmp/ormo-ps-cifar10", help="CIFAR-10 (make bench extracts it there)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one job may take")
    parser.add_argument("--sharded", action="store_true",
                        help="the K=8 jobs with a sharded server (PS_SHARDS=2) across the nodes, into multinode_sharded.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear the cluster down (a `with` block) on SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    reason = unavailable()
    if reason:
        sys.exit(f"bench.multinode cannot run here: {reason}")
    install()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "applied": {}}
    rows: list[dict] = []
    with Cluster(nodes=3, slurmd_timeout=120) as cluster:
        placements = PLACEMENTS if not args.sharded else list(PROFILES)
        for placement in placements:
            for node in cluster.node_names:
                applied = cluster.shape(cluster.node_ns(node), "none" if placement == "one node" else placement)
            if placement != "one node":
                meta.setdefault("applied", {})[placement] = applied
            for spec in (sharded_jobs if args.sharded else jobs)(args.data_dir, args.quick):
                out = cluster.dir / f"run-{len(rows)}"
                print(f"[{len(rows) + 1}] {spec['job']} K={spec['K']} {placement} ...", flush=True)
                row = {"job": spec["job"], "K": spec["K"], "placement": placement}
                row |= measure(cluster, out, spec["settings"], 1 if placement == "one node" else 3, args.timeout)
                print(f"    {row}", flush=True)
                rows.append(row)
                write(rows, meta, "multinode_sharded" if args.sharded else "multinode")
    print(f"results: {RESULTS / ('multinode_sharded.md' if args.sharded else 'multinode.md')}")


if __name__ == "__main__":
    main()
