"""Checkpoints: the server's whole state in one plain `torch.save` file, written atomically, self-checking.

`checkpoint.pt` is what `torch.load(path, weights_only=True)` reads: `{"format": "ormo-ps-checkpoint",
"version": 2, "state": ..., "sha256": ...}`, where `sha256` is a digest of the state's contents (every
tensor's bytes, dtype and shape and every other value, in a fixed order), recomputed and compared on load,
so a flipped bit is refused as well as a truncated file. Written to a temporary file, fsynced and renamed
over the old one: a crash or a full disk leaves the old checkpoint or the new one, never a torn file.
Version 1 (a text header with the digest of the pickled bytes before them) is still read.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = "ormo-ps-checkpoint"
VERSION = 2
MAGIC_V1 = b"ORMO-PS-CKPT 1\n"
CHECKPOINT_NAME = "checkpoint.pt"
FINAL_NAME = "final.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or of another format."""


def state_digest(state: Any) -> str:
    """SHA-256 over a value's contents: tensors by dtype, shape and bytes; containers in order (dict keys
    sorted); other values by type and repr. Equal for a state and the same state saved and loaded."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def _write_atomically(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temporary file behind
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    save_state(path, state)
    return Path(path)


def save_state(path: str | Path, state: dict[str, Any]) -> str:
    """Write `state` as a checkpoint file (atomically); returns its digest (what `load_checkpoint` checks)."""
    digest = state_digest(state)
    _write_atomically(Path(path), {"format": FORMAT, "version": VERSION, "state": state, "sha256": digest})
    return digest


def _torch_load(data: bytes, path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for contents it refuses
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path} is no ps-server checkpoint: it holds objects other than tensors, "
                                  "numbers and strings, which are not loaded") from None
        raise CheckpointError(f"{path} is corrupt or truncated: torch cannot read it ({type(e).__name__})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if data.startswith(MAGIC_V1):
        return _load_v1(data, path)
    saved = _torch_load(data, path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an OrMo-PS checkpoint")
    if saved.get("version") != VERSION or "state" not in saved:
        raise CheckpointError(f"{path} is an OrMo-PS checkpoint of version {saved.get('version')!r}; "
                              f"this ps-server reads versions 1 and {VERSION}")
    if state_digest(saved["state"]) != saved.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its checksum does not match its contents")
    return saved["state"]


def _load_v1(data: bytes, path: Path) -> dict[str, Any]:
    header_end = len(MAGIC_V1) + 65
    if len(data) < header_end or data[header_end - 1 : header_end] != b"\n":
        raise CheckpointError(f"{path} is truncated: its header is incomplete")
    digest, payload = data[len(MAGIC_V1) : header_end - 1].decode("ascii", "replace"), data[header_end:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated: its checksum does not match its contents")
    return _torch_load(payload, path)


def save_final(out_dir: str | Path, params: torch.Tensor, iteration: int, config: dict[str, Any],
               model_state: dict[str, Any] | None = None) -> Path:
    """`final.pt`, a plain `torch.save` of the run's result: the flat parameters, the iteration, the run's
    configuration and, when given, the model's state dict (BatchNorm statistics included)."""
    result = {"params": params.detach().cpu().clone(), "iteration": iteration, "config": config}
    if model_state is not None:
        result["model_state"] = model_state
    return _write_atomically(Path(out_dir) / FINAL_NAME, result)
