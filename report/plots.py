"""Figures: test accuracy and training loss against epochs and against time, one panel per (K, setting)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from report.runs import Run, method_key, method_label  # noqa: E402

FIGURES = {
    "test_accuracy_vs_epoch": ("epoch", "test_accuracy", "epoch", "test accuracy"),
    "train_loss_vs_epoch": ("epoch", "train_loss", "epoch", "training loss"),
    "test_accuracy_vs_time": ("time", "test_accuracy", "time (s; virtual for the simulator)", "test accuracy"),
    "train_loss_vs_time": ("time", "train_loss", "time (s; virtual for the simulator)", "training loss"),
}


def _curve(run: Run, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    records = run.evals if y == "test_accuracy" else (run.evals if any(e.get("train_loss") is not None
                                                                         for e in run.evals) else run.progress)
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    xs, ys = zip(*pts)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _mean_curve(runs: list[Run], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds averaged on the first run's x grid (interpolated), with the standard deviation."""
    curves = [c for c in (_curve(r, x, y) for r in runs) if len(c[0])]
    if not curves:
        return np.empty(0), np.empty(0), np.empty(0)
    grid = curves[0][0]
    stacked = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    return grid, stacked.mean(axis=0), stacked.std(axis=0)


def write_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = sorted({r.group for r in runs}, key=lambda g: (g[0], g[1] != "hom."))
    by_group_algo: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        by_group_algo[(r.group, r.method)].append(r)
    written = []
    for name, (x, y, xlabel, ylabel) in FIGURES.items():
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
        for ax, g in zip(axes[0], groups):
            for algo in sorted({a for (gg, a) in by_group_algo if gg == g}, key=method_key):
                xs, mean, std = _mean_curve(by_group_algo[(g, algo)], x, y)
                if len(xs):
                    line, = ax.plot(xs, mean, label=method_label(algo))
                    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            ax.set_title(f"K={g[0]} {g[1]}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if y == "train_loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
