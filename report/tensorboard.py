"""TensorBoard event files from metrics.jsonl: one folder per run, its progress and eval records as scalars
(step = the server iteration, wall time = the record's timestamp) and its configuration as text.

    ps-plot runs/ --tensorboard runs/tb && tensorboard --logdir runs/tb

Needs the `tensorboard` package (`pip install 'ormo-ps[tensorboard]'`)."""

from __future__ import annotations

from pathlib import Path

from ormo_ps.common.live_tensorboard import SCALARS, config_text, scalars, summary_writer_class
from ormo_ps.report.runs import Run

__all__ = ["SCALARS", "export", "run_names"]


def run_names(runs: list[Run]) -> list[str]:
    """Short distinct names: each run's directory with as many parent directories as tell it apart."""
    depth = 1
    while True:
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth > max(len(r.path.resolve().parts) for r in runs):
            return names
        depth += 1


def export(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write one event-file folder per run under `out_dir`; returns the folders. The tags, steps and wall times
    are those a live run writes (common/live_tensorboard.py)."""
    try:
        SummaryWriter = summary_writer_class()
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    folders = []
    for run, name in zip(runs, run_names(runs), strict=True):
        folder = out_dir / name
        with SummaryWriter(log_dir=str(folder)) as writer:
            writer.add_text("config", config_text(run.config | {"source": run.source, "slow": run.slow}), 0)
            for kind, records in (("train", run.progress), ("eval", run.evals)):
                for record in records:
                    for tag, value in scalars(kind, record):
                        writer.add_scalar(tag, value, record["iteration"], walltime=record.get("timestamp"))
        folders.append(folder)
    return folders
