"""Tables in the paper's format: methods as rows, (K, hom./het.) as columns, mean ± std over seeds.

A method whose runs in one column differ in more than the seed (the source, the learning rate, ...) gets one
row per configuration, named by what differs (`ormo_ps.report.runs.variants`)."""

from __future__ import annotations

from collections import defaultdict

from ormo_ps.report.runs import Run, mean_std, method_key, row_label, variants


def _cell(runs: list[Run], values: list[float | None], scale: float, digits: int) -> str:
    diverged = sum(r.diverged for r in runs)
    unfinished = sum(not r.diverged and not r.summary for r in runs)
    valid = [v * scale for v in values if v is not None]
    ms = mean_std(valid)
    if ms is None:
        if diverged and not unfinished:
            return "diverged" if len(runs) == 1 else f"diverged ({diverged} of {len(runs)})"
        if len(runs) == 1:
            return "unfinished" if unfinished else "not evaluated"
        return ", ".join([f"{diverged} diverged"] * bool(diverged) + [f"{unfinished} unfinished"] * bool(unfinished)
                         ) or "not evaluated"
    notes = ["n=1"] * (len(valid) == 1) + [f"{diverged} diverged"] * bool(diverged)
    if unfinished:
        notes.append("unfinished" if len(runs) == 1 else f"{unfinished} unfinished")
    text = f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}" if len(valid) > 1 else f"{ms[0]:.{digits}f}"
    return text + (f" ({', '.join(notes)})" if notes else "")


def paper_table(runs: list[Run], metric: str) -> str:
    """`metric` is "test_accuracy" (in %) or "train_loss"."""
    groups = sorted({r.group for r in runs}, key=lambda g: (g[0], g[1] != "hom."))
    variant = variants(runs)
    cells: dict[tuple[tuple[str, str], tuple[int, str]], list[Run]] = defaultdict(list)
    for r in runs:
        cells[((r.method, variant[r]), r.group)].append(r)
    rows = sorted({(r.method, variant[r]) for r in runs}, key=lambda row: (method_key(row[0]), row[1]))
    head = "| method | " + " | ".join(f"{k} {s}" for k, s in groups) + " |"
    lines = [head, "|---" * (len(groups) + 1) + "|"]
    for row in rows:
        texts = [row_label(*row)]
        for g in groups:
            rs = cells.get((row, g), [])
            if not rs:
                texts.append("-")
            elif metric == "test_accuracy":
                texts.append(_cell(rs, [r.final_test_accuracy for r in rs], 100.0, 2))
            else:
                texts.append(_cell(rs, [r.final_train_loss for r in rs], 1.0, 4))
        lines.append("| " + " | ".join(texts) + " |")
    seeds = sorted({len(v) for v in cells.values()})
    lines.append("")
    lines.append(f"Mean ± standard deviation over {'/'.join(map(str, seeds))} run(s) per cell"
                 + ("; (n=1): a single run, no spread." if 1 in seeds else "."))
    return "\n".join(lines)
