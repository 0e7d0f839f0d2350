"""Loading runs: every `metrics.jsonl` under the given paths, with the key that groups its seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.metrics import read_metrics
from server.algorithms import ALGORITHMS

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


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    setting: str  # "hom." or "het."
    source: str  # "sim" or "server"
    evals: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

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


def load_run(metrics_path: Path) -> Run | None:
    records = read_metrics(metrics_path)
    start = next((r for r in records if r["event"] == "start"), None)
    if start is None:
        return None
    timing = start.get("timing") or {}
    slow = (timing.get("slow_fraction", 0) > 0 and timing.get("slow_factor", 1) > 1) or start.get("slow_workers")
    run = Run(metrics_path.parent, start["config"], "het." if slow else "hom.", start.get("source", "?"))
    for r in records:
        if r["event"] == "eval":
            run.evals.append(r)
        elif r["event"] == "progress":
            run.progress.append(r)
        elif r["event"] == "summary":
            run.summary = r
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


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
