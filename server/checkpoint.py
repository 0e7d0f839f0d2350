"""Checkpoints: the server's whole state in one file, written atomically and checked by a SHA-256 sum.

Layout: the magic line `ORMO-PS-CKPT 1\n`, the hex SHA-256 of the payload and `\n`, then the payload
(a `torch.save` of the state dict). Written to a temporary file, fsynced, renamed over the old one, so a
crash leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

MAGIC = b"ORMO-PS-CKPT 1\n"
CHECKPOINT_NAME = "checkpoint.pt"
FINAL_NAME = "final.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or of another format."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + digest + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an OrMo-PS checkpoint (missing header {MAGIC!r})")
    header_end = len(MAGIC) + 65
    if len(data) < header_end or data[header_end - 1 : header_end] != b"\n":
        raise CheckpointError(f"{path} is truncated: its header is incomplete")
    digest, payload = data[len(MAGIC) : header_end - 1].decode("ascii", "replace"), data[header_end:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated: its checksum does not match its contents")
    return torch.load(io.BytesIO(payload), weights_only=True)


def save_final(out_dir: str | Path, params: torch.Tensor, iteration: int, config: dict[str, Any],
               model_state: dict[str, Any] | None = None) -> Path:
    """`final.pt`, a plain `torch.save` of the run's result: the flat parameters, the iteration, the run's
    configuration and, when given, the model's state dict (BatchNorm statistics included). Written to a
    temporary file and renamed, so a reader never sees a torn one."""
    path = Path(out_dir) / FINAL_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    result = {"params": params.detach().cpu().clone(), "iteration": iteration, "config": config}
    if model_state is not None:
        result["model_state"] = model_state
    torch.save(result, tmp)
    tmp.replace(path)
    return path
