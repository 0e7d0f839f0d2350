"""Loading runs: every `metrics.jsonl` under the given paths, and what groups them: runs of one configuration
and source (the simulator's or the service's) that differ only in their seed are seeds of one group."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ormo_ps.common.metrics import LAUNCH_FILE, read_metrics
from ormo_ps.server.algorithms import ALGORITHMS
from ormo_ps.server.config import RunConfig

VANILLA = "-vanilla"  # a method name's suffix for OrMo's vanilla-SGD-step ablation (the paper's Table 4)


def method_label(method: str) -> str:
    """The method's name as the paper writes it (the algorithm registry's label)."""
    algo = method.removesuffix(VANILLA)
    label = ALGORITHMS[algo].label if algo in ALGORITHMS else algo
    return label + (", vanilla SGD step" if method.endswith(VANILLA) else "")


def method_key(method: str) -> tuple[int, str]:
    """Sort key: the paper's order of methods (an ablation right after its method's variants)."""
    algo = method.removesuffix(VANILLA)
    rank = ALGORITHMS[algo].paper_rank if algo in ALGORITHMS else len(ALGORITHMS) + 1
    return (2 * rank + (3 if method.endswith(VANILLA) else 0), method)


@dataclass(eq=False)
class Run:
    path: Path
    config: dict[str, Any]
    source: str  # "sim" or "server"
    slow: tuple[int, float | None] | None = None  # (how many workers were slow, how much slower), None: none
    evals: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """ "hom." or "het." (some workers slower)."""
        return "het." if self.slow else "hom."

    @property
    def algo(self) -> str:
        return self.config["algo"]

    @property
    def method(self) -> str:
        """The algorithm, or `ormo-vanilla` for OrMo's vanilla-SGD-step ablation (the paper's Table 4)."""
        return self.algo + VANILLA if self.config.get("vanilla_sgd_step") else self.algo

    @property
    def workers(self) -> int:
        return int(self.config["workers"])

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def group(self) -> tuple[int, str]:
        return (self.workers, self.setting)

    @property
    def final_test_accuracy(self) -> float | None:
        return self.evals[-1]["test_accuracy"] if self.evals else None

    @property
    def final_train_loss(self) -> float | None:
        if self.evals and self.evals[-1].get("train_loss") is not None:
            return self.evals[-1]["train_loss"]
        return self.summary.get("final_train_loss")

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged"))


def _slow_workers(start: dict[str, Any], launch_file: Path) -> tuple[int, float | None] | None:
    """How many workers of a run were slow and by how much: the simulator's start record says it, ps-launch's
    launch.json beside the metrics (the server does not know which of its workers are slow)."""
    timing = start.get("timing") or {}
    count = len(start.get("slow_workers") or ())
    factor = timing.get("slowdown", timing.get("slow_factor"))
    if launch_file.exists():
        launch = json.loads(launch_file.read_text())
        count, factor = launch.get("slow_workers", 0), launch.get("slowdown")
    if count == 0 or (factor is not None and factor <= 1):
        return None
    return count, factor


def load_run(metrics_path: Path) -> Run | None:
    records = read_metrics(metrics_path)
    start = next((r for r in records if r["event"] == "start"), None)
    if start is None:
        return None
    run = Run(metrics_path.parent, start["config"], start.get("source", "?"),
              _slow_workers(start, metrics_path.parent / LAUNCH_FILE))
    for r in records:
        if r["event"] == "eval":
            run.evals.append(r)
        elif r["event"] == "progress":
            run.progress.append(r)
        elif r["event"] == "summary":
            run.summary = r
        elif r["event"] == "start" and r.get("resumed_from_iteration") is not None:
            # A resumed server: what was recorded past its checkpoint was lost with the crash; it is redone.
            resumed = r["resumed_from_iteration"]
            run.evals = [e for e in run.evals if e["iteration"] <= resumed]
            run.progress = [p for p in run.progress if p["iteration"] <= resumed]
    if run.slow is None:  # a service run without launch.json (compose, k8s): the workers said it themselves
        slow = [s for s in run.summary.get("worker_slowdowns") or () if s > 1]
        run.slow = (len(slow), max(slow)) if slow else None
    return run


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under `paths` (a run directory, a metrics.jsonl file, or a folder of runs)."""
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif (p / "metrics.jsonl").exists():
            files.append(p / "metrics.jsonl")
        elif p.is_dir():
            files.extend(sorted(p.rglob("metrics.jsonl")))
        else:
            raise FileNotFoundError(f"no run at {p}: expected a directory holding metrics.jsonl, or a folder of runs")
    runs = [r for r in (load_run(f) for f in files) if r is not None]
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl with a start record under {', '.join(map(str, paths))}")
    return runs


# Fields of a run's configuration that say where its data is, not what the run computes.
_NOT_CONFIGURATION = ("seed", "data_dir", "download")


def configuration(run: Run) -> dict[str, Any]:
    """All that makes a run what it is, its seed aside: its configuration (as the current RunConfig reads it,
    so older records compare equal), its source and its slow workers."""
    try:
        config = RunConfig.from_dict(run.config).to_dict()
    except (TypeError, ValueError):  # a configuration this version does not know: compare it as written
        config = dict(run.config)
    fields = {k: v for k, v in config.items() if k not in _NOT_CONFIGURATION}
    return fields | {"source": run.source, "slow": run.slow}


def _describe(name: str, value: Any) -> str:
    if name == "source":
        return str(value)
    if name == "slow":
        return "no slow workers" if value is None else f"{value[0]} slow" + (
            f" {value[1]:g}x" if value[1] is not None else "")
    if isinstance(value, (list, tuple)):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{name.replace('_', '-')} {value}"


def variants(runs: list[Run]) -> dict[Run, str]:
    """Per run, what tells its group apart from the other groups of its method and column (K, setting): the
    fields of `configuration` that differ within some method and column ("sim", "lr 0.05", "2 slow 8x");
    empty where each method and column holds runs of one configuration. Runs with the same method, column
    and variant differ only in their seed."""
    configs = {r: configuration(r) for r in runs}
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        cells[(r.method, r.group)].append(configs[r])
    differing = sorted({key for cell in cells.values() for key in set().union(*cell)
                        if len({json.dumps(c.get(key), sort_keys=True, default=str) for c in cell}) > 1})
    return {r: ", ".join(_describe(k, configs[r].get(k)) for k in differing) for r in runs}


def row_label(method: str, variant: str) -> str:
    return method_label(method) + (f" ({variant})" if variant else "")


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
