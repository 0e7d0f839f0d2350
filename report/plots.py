"""Figures: test accuracy and training loss against epochs and against time, one panel per (K, setting), one
line (with markers) per method and configuration, averaged over its seeds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ormo_ps.report.runs import Run, method_key, row_label, variants  # noqa: E402

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
    """Seeds averaged on the union of their x values: at each x, the mean (and standard deviation) of the runs
    whose curve spans it (interpolated between their own points), so a run with few points takes nothing
    away from one with many."""
    curves = [c for c in (_curve(r, x, y) for r in runs) if len(c[0])]
    if not curves:
        return np.empty(0), np.empty(0), np.empty(0)
    grid = np.unique(np.concatenate([cx for cx, _ in curves]))
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (cx, cy) in enumerate(curves):
        order = np.argsort(cx, kind="stable")
        inside = (grid >= cx.min()) & (grid <= cx.max())
        values[i, inside] = np.interp(grid[inside], cx[order], cy[order])
    return grid, np.nanmean(values, axis=0), np.nanstd(values, axis=0)  # every x is on some run's curve


def too_short(runs: list[Run]) -> list[str]:
    """Warnings for runs a figure shows badly: no evaluation (left out of the test-accuracy figures) or one
    (a single point: evaluate more often, e.g. --eval-every 1)."""
    said = []
    for r in runs:
        if not r.evals:
            why = "it diverged" if r.diverged else ("it did not finish" if not r.summary else "no evaluation")
            said.append(f"{r.path}: no evaluation ({why}): not in the test-accuracy figures")
        elif len(r.evals) == 1:
            said.append(f"{r.path}: one evaluation: a single point in the test-accuracy figures "
                        "(evaluate more often for a curve, e.g. --eval-every 1)")
    return said


def figure(runs: list[Run], name: str) -> plt.Figure:
    """The figure `name` of FIGURES: a panel per (K, setting), a line with markers per method and configuration."""
    x, y, xlabel, ylabel = FIGURES[name]
    groups = sorted({r.group for r in runs}, key=lambda g: (g[0], g[1] != "hom."))
    variant = variants(runs)
    lines: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        lines[(r.group, r.method, variant[r])].append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, g in zip(axes[0], groups):
        drawn = 0
        for (_, method, var) in sorted((k for k in lines if k[0] == g), key=lambda k: (method_key(k[1]), k[2])):
            xs, mean, std = _mean_curve(lines[(g, method, var)], x, y)
            if not len(xs):
                continue
            line, = ax.plot(xs, mean, marker="o", markersize=3 if len(xs) > 1 else 6, label=row_label(method, var))
            if (std > 0).any():
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            drawn += 1
        ax.set_title(f"K={g[0]} {g[1]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y == "train_loss" and drawn and all((ln.get_ydata() > 0).all() for ln in ax.get_lines()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return fig


def write_figures(runs: list[Run], out_dir: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Every figure of FIGURES as OUT_DIR/NAME.png; `warn` hears of runs too short to draw (`too_short`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for line in too_short(runs):
        (warn or (lambda m: None))(line)
    written = []
    for name in FIGURES:
        fig = figure(runs, name)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
