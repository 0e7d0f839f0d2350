"""Regenerates the gRPC stubs in common/pb/ from proto/ps/v1/ (the one rule behind `make proto`).

protoc is run with the import mapping ``-Icommon/pb=proto/ps/v1``: the .proto is compiled under the
virtual path ``common/pb/parameter_server.proto``, so the generated ``_pb2_grpc.py`` imports its
``_pb2`` as ``from ormo_ps.common.pb import parameter_server_pb2`` (a package import that works from the repo
root and once installed) without any post-processing of generated text. The proto package stays
``ps.v1``; only the descriptor's file name is ``common/pb/parameter_server.proto``.

Usage: ``python -m ormo_ps.common.pb.generate [OUT_DIR]`` (default: this directory).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PB_DIR = Path(__file__).resolve().parent
REPO_ROOT = PB_DIR.parent.parent
PROTO_DIR = REPO_ROOT / "proto" / "ps" / "v1"
VIRTUAL_DIR = "ormo_ps/common/pb"
PROTO_FILES = ("parameter_server.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files() -> list[str]:
    """Names of the files `main` writes, relative to its output directory."""
    return [Path(p).stem + s for p in PROTO_FILES for s in GENERATED_SUFFIXES]


def main(out_dir: str | Path | None = None) -> list[Path]:
    """Compiles the protos and writes the stubs into out_dir; returns the written paths."""
    # Imported here so that importing ormo_ps.common.pb never needs grpcio-tools (a dev/test dependency).
    import importlib.resources

    from grpc_tools import protoc

    out = Path(out_dir) if out_dir is not None else PB_DIR
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_DIR}={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL_DIR}/{name}" for name in PROTO_FILES),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args[1:])}")
        written = []
        for name in generated_files():
            target = out / name
            shutil.copyfile(Path(tmp) / VIRTUAL_DIR / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in main(sys.argv[1] if len(sys.argv) > 1 else None):
        print(path)
