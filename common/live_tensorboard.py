"""Live TensorBoard: a run's records written as TensorBoard events as they are written to metrics.jsonl.

`--tensorboard DIR` (ps-server, ps-eval, ps-sim, ps-launch) hangs a `LiveTensorBoard` on the run's
`MetricsWriter` (common/metrics.py): every record the writer writes, it is handed too, the same dict with the
same values, so `tensorboard --logdir DIR` shows the run while it trains and shows what metrics.jsonl holds.
Tags, steps and wall times are those of ps-plot's after-the-fact export (report/tensorboard.py, which takes
`SCALARS` from here): `train/FIELD` from progress records and `eval/FIELD` from eval records, step = the
server iteration, wall time = the record's timestamp, the configuration as the text `config`; so a run
watched live and an old run exported look the same. A run's events go to DIR/<the name of its output
directory>, as the export names a run. ps-eval, a process of its own beside the server, writes into the
folder `eval` below it: TensorBoard follows only the newest event file of a folder (unless started with
--reload_multifile=true), so two processes writing into one folder would hide the older one's new events.

The events are handed to tensorboard's writer thread (no file work on the caller's thread, which is the
server's event loop) and reach the disk within `FLUSH_SECONDS`. A write that fails is said once and never
stops the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Record fields written as scalars, by the kind of record (the tag is KIND/FIELD): progress records are "train".
SCALARS = {
    "train": ("train_loss", "lr", "staleness_mean", "staleness_max", "epoch"),
    "eval": ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_loss"),
}
KIND_OF_EVENT = {"progress": "train", "eval": "eval"}
FLUSH_SECONDS = 1.0  # how soon an event is on disk for TensorBoard to read
MISSING = "--tensorboard needs the tensorboard package: pip install 'ormo-ps[tensorboard]'"


class TensorBoardError(ValueError):
    """--tensorboard cannot be used: the package is missing, or the directory cannot be written."""


def scalars(kind: str, record: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) of each scalar a record of `kind` ("train", "eval") holds; fields it lacks or holds as null
    (a loss not yet known, a non-finite one) are left out."""
    return [(f"{kind}/{field}", record[field]) for field in SCALARS[kind] if record.get(field) is not None]


def config_text(config: dict[str, Any]) -> str:
    """The `config` text of a run (markdown: TensorBoard's text tab renders it)."""
    return "```\n" + json.dumps(config, indent=1) + "\n```"


def summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardError(MISSING) from None
    return SummaryWriter


def run_dir(tensorboard: str | Path, out: str | Path | None, part: str | None = None) -> Path:
    """Where a run's events go: DIR/<its output directory's name> (DIR itself for a run with no output), the
    events of another process of the run (`part`: "eval") in a folder of that name below it."""
    root = Path(tensorboard)
    folder = root / Path(out).resolve().name if out is not None else root
    return folder / part if part else folder


def check(tensorboard: str | Path) -> None:
    """TensorBoardError, in words a user can act on, when `--tensorboard` cannot work (before a run starts)."""
    summary_writer_class()
    folder = Path(tensorboard)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".ormo-ps-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TensorBoardError(f"cannot write to --tensorboard {tensorboard}: {e.strerror or e}") from None


class LiveTensorBoard:
    """A listener of a MetricsWriter (`record(r)` per record written, `close()`) that writes TensorBoard events
    into `log_dir`."""

    def __init__(self, log_dir: str | Path, flush_secs: float = FLUSH_SECONDS) -> None:
        check(log_dir)
        self.log_dir = Path(log_dir)
        self._writer = summary_writer_class()(log_dir=str(log_dir), flush_secs=flush_secs, max_queue=1000)
        self.failed = False

    def record(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self._write(record)
        except Exception as e:  # noqa: BLE001 - a full disk, a dead writer thread: the run goes on
            self.failed = True
            logger.error("cannot write TensorBoard events to %s (%s): no more are written; metrics.jsonl has "
                         "every record (ps-plot --tensorboard exports it)", self.log_dir, e)

    def _write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        walltime = record.get("timestamp")
        if event == "start":
            self._writer.add_text("config", config_text(record["config"] | {"source": record.get("source")}), 0,
                                  walltime=walltime)
        elif event in KIND_OF_EVENT:
            for tag, value in scalars(KIND_OF_EVENT[event], record):
                self._writer.add_scalar(tag, value, record["iteration"], walltime=walltime)
        elif event == "summary":
            self._writer.flush()  # the run's last progress record is on disk now

    def close(self) -> None:
        self._writer.close()
