"""TensorBoard event files from metrics.jsonl: one folder per run, its progress and eval records as scalars
(step = the server iteration, wall time = the record's timestamp) and its configuration as text.

    ps-plot runs/ --tensorboard runs/tb && tensorboard --logdir runs/tb

Needs the `tensorboard` package (`pip install 'ormo-ps[tensorboard]'`)."""

from __future__ import annotations

import json
from pathlib import Path

from ormo_ps.report.runs import Run

# Record fields written as scalars, by record kind (the tag is KIND/FIELD).
SCALARS = {
    "train": ("train_loss", "lr", "staleness_mean", "staleness_max", "epoch"),
    "eval": ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_loss"),
}


def run_names(runs: list[Run]) -> list[str]:
    """Short distinct names: each run's directory with as many parent directories as tell it apart."""
    depth = 1
    while True:
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth > max(len(r.path.resolve().parts) for r in runs):
            return names
        depth += 1


def export(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write one event-file folder per run under `out_dir`; returns the folders."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'ormo-ps[tensorboard]'") from None
    folders = []
    for run, name in zip(runs, run_names(runs), strict=True):
        folder = out_dir / name
        with SummaryWriter(log_dir=str(folder)) as writer:
            writer.add_text("config", "```\n" + json.dumps(run.config | {"source": run.source, "slow": run.slow},
                                                          indent=1) + "\n```", 0)
            for kind, records in (("train", run.progress), ("eval", run.evals)):
                for record in records:
                    for field in SCALARS[kind]:
                        if record.get(field) is not None:
                            writer.add_scalar(f"{kind}/{field}", record[field], record["iteration"],
                                              walltime=record.get("timestamp"))
        folders.append(folder)
    return folders
