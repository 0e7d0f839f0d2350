"""Tables in the paper's format: methods as rows, (K, hom./het.) as columns, mean ± std over seeds."""

from __future__ import annotations

from collections import defaultdict

from report.runs import Run, mean_std, method_key, method_label


def _cell(values: list[float | None], scale: float, digits: int, diverged: int) -> str:
    ms = mean_std([v * scale if v is not None else None for v in values])
    if ms is None:
        return "diverged" if diverged else "-"
    text = f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"
    return text + (f" ({diverged} diverged)" if diverged else "")


def paper_table(runs: list[Run], metric: str) -> str:
    """`metric` is "test_accuracy" (in %) or "train_loss"."""
    groups = sorted({r.group for r in runs}, key=lambda g: (g[0], g[1] != "hom."))
    cells: dict[tuple[str, tuple[int, str]], list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.method, r.group)].append(r)
    methods = sorted({r.method for r in runs}, key=method_key)
    head = "| method | " + " | ".join(f"{k} {s}" for k, s in groups) + " |"
    lines = [head, "|---" * (len(groups) + 1) + "|"]
    for m in methods:
        row = [method_label(m)]
        for g in groups:
            rs = cells.get((m, g), [])
            if metric == "test_accuracy":
                values = [r.final_test_accuracy for r in rs]
                row.append(_cell(values, 100.0, 2, sum(r.diverged for r in rs)))
            else:
                values = [r.final_train_loss for r in rs]
                row.append(_cell(values, 1.0, 4, sum(r.diverged for r in rs)))
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({len(v) for v in cells.values()})
    lines.append("")
    lines.append(f"Mean ± standard deviation over {'/'.join(map(str, seeds))} run(s) per cell.")
    return "\n".join(lines)
