"""The wire contract: committed stubs match the .proto, every field is commented, enums start at _UNSPECIFIED."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ormo_ps.common.pb import generate
from ormo_ps.common.pb import parameter_server_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = REPO_ROOT / "proto" / "ps" / "v1" / "parameter_server.proto"

_DECL = re.compile(r"^(message|enum|oneof|service)\s+(\w+)\s*\{\s*(\}\s*)?(//.*)?$")
_RPC = re.compile(r"^rpc\s+\w+\s*\(.*\)\s*returns\s*\(.*\)\s*(;|\{\s*\})\s*(//.*)?$")
_FIELD = re.compile(
    r"^(?:optional\s+|repeated\s+)?(?:map\s*<[^>]+>|[A-Za-z_][\w.]*)\s+(\w+)\s*=\s*\d+\s*(?:\[[^\]]*\])?\s*;\s*(//.*)?$"
)
_ENUM_VALUE = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*(?:\[[^\]]*\])?\s*;\s*(//.*)?$")


@dataclass
class _Item:
    kind: str  # "field", "enum_value", "message", "enum", "oneof", "service", "rpc"
    scope: str  # dotted name of the enclosing message/enum/service ("" at top level)
    name: str
    number: int | None
    commented: bool
    line: int


def _parse(text: str) -> list[_Item]:
    """A line-based reader of our own .proto style (one declaration per line, `//` comments only)."""
    items: list[_Item] = []
    stack: list[tuple[str, str]] = []  # (kind, name)
    comment_above = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("/*"):
            raise AssertionError(f"{PROTO.name}:{lineno}: use // comments, not /* */")
        if not line:
            comment_above = False
            continue
        if line.startswith("//"):
            comment_above = True
            continue
        trailing = "//" in line
        commented = comment_above or trailing
        comment_above = False
        # Messages and enums name their scope; oneofs belong to the enclosing message.
        scope = ".".join(name for kind, name in stack if kind in ("message", "enum", "service"))
        if line.startswith("}"):
            stack.pop()
            continue
        if re.match(r"(syntax|package|import|option|reserved)\b", line):
            continue
        if m := _DECL.match(line):
            items.append(_Item(m[1], scope, m[2], None, commented, lineno))
            if not m[3]:
                stack.append((m[1], m[2]))
            continue
        if _RPC.match(line):
            items.append(_Item("rpc", scope, line.split()[1].split("(")[0], None, commented, lineno))
            continue
        kind = stack[-1][0] if stack else ""
        if kind == "enum" and (m := _ENUM_VALUE.match(line)):
            items.append(_Item("enum_value", scope, m[1], int(m[2]), commented, lineno))
            continue
        if kind in ("message", "oneof") and (m := _FIELD.match(line)):
            items.append(_Item("field", scope, m[1], None, commented, lineno))
            continue
        raise AssertionError(f"{PROTO.name}:{lineno}: line not understood by the comment check: {line!r}")
    assert not stack, f"unbalanced braces in {PROTO.name}"
    return items


@pytest.fixture(scope="module")
def proto_items() -> list[_Item]:
    return _parse(PROTO.read_text())


def _descriptor_fields() -> dict[str, set[str]]:
    """Field names per message (dotted path from the package), from the generated descriptor."""
    out: dict[str, set[str]] = {}

    def walk(messages, prefix: str) -> None:
        for name, desc in messages.items():
            out[prefix + name] = {f.name for f in desc.fields}
            walk(desc.nested_types_by_name, prefix + name + ".")

    walk(pb.DESCRIPTOR.message_types_by_name, "")
    return out


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates the stubs")
    generate.main(tmp_path)
    stale = [
        name
        for name in generate.generated_files()
        if (tmp_path / name).read_bytes() != (generate.PB_DIR / name).read_bytes()
    ]
    assert not stale, f"stale generated stubs in common/pb/: {stale}; run `make proto` and commit them"


def test_makefile_proto_target_runs_the_generator() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^proto:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "Makefile has no `proto` target"
    assert "-m ormo_ps.common.pb.generate" in recipe[1], recipe[1]


def test_every_field_and_enum_value_is_commented(proto_items: list[_Item]) -> None:
    missing = [f"line {i.line}: {i.kind} {i.scope}.{i.name}".replace(" .", " ") for i in proto_items if not i.commented]
    assert not missing, "uncommented declarations in parameter_server.proto:\n" + "\n".join(missing)


def test_comment_check_sees_every_field(proto_items: list[_Item]) -> None:
    # Guards the parser itself: a field it failed to recognise would escape the comment check.
    parsed: dict[str, set[str]] = {}
    for item in proto_items:
        if item.kind == "message":
            parsed.setdefault(f"{item.scope}.{item.name}".lstrip("."), set())
        elif item.kind == "field":
            parsed.setdefault(item.scope, set()).add(item.name)
    assert parsed == _descriptor_fields()
    enum_values = {i.name for i in proto_items if i.kind == "enum_value"}
    assert enum_values == {v.name for e in pb.DESCRIPTOR.enum_types_by_name.values() for v in e.values}


def test_enum_zero_values_are_unspecified(proto_items: list[_Item]) -> None:
    zeros = {i.scope: i.name for i in proto_items if i.kind == "enum_value" and i.number == 0}
    enums = {i.name for i in proto_items if i.kind == "enum"}
    assert set(zeros) == enums, f"enums without a 0 value: {enums - set(zeros)}"
    bad = {enum: name for enum, name in zeros.items() if not name.endswith("_UNSPECIFIED")}
    assert not bad, f"enum 0 values must end with _UNSPECIFIED: {bad}"


def test_contract_shape() -> None:
    assert pb.DESCRIPTOR.package == "ps.v1"
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert methods == {
        "Train": ("WorkerMessage", "ServerMessage", True, True),
        "GetParameters": ("GetParametersRequest", "Parameters", False, False),
        "GetStatus": ("GetStatusRequest", "Status", False, False),
    }
    assert {v.name: v.number for v in pb.DType.DESCRIPTOR.values} == {
        "DTYPE_UNSPECIFIED": 0,
        "DTYPE_FLOAT32": 1,
        "DTYPE_FLOAT16": 2,
        "DTYPE_BFLOAT16": 3,
        "DTYPE_FLOAT64": 4,
    }
    tensor = pb.Tensor.DESCRIPTOR.fields_by_name
    assert tensor["data"].type == tensor["data"].TYPE_BYTES
    assert tensor["numel"].type == tensor["numel"].TYPE_UINT64
    # A reconnecting worker's requested id must distinguish "absent" from 0.
    assert pb.Register.DESCRIPTOR.fields_by_name["requested_worker_id"].has_presence
    assert not pb.Register().HasField("requested_worker_id")
    assert pb.Register(requested_worker_id=0).HasField("requested_worker_id")
    assert [f.name for f in pb.WorkerMessage.DESCRIPTOR.oneofs_by_name["payload"].fields] == [
        "register", "gradient", "ready", "chunk"]
    assert [f.name for f in pb.ServerMessage.DESCRIPTOR.oneofs_by_name["payload"].fields] == [
        "welcome", "parameters", "stop", "chunk"]
    # A chunk has the same field number both ways: ormo_ps.common.wire writes one chunk message for either direction.
    assert pb.WorkerMessage.DESCRIPTOR.fields_by_name["chunk"].number == pb.ServerMessage.DESCRIPTOR.fields_by_name[
        "chunk"].number
    assert tensor["chunked"].type == tensor["chunked"].TYPE_BOOL


def test_grpc_stub_imports_pb2_through_the_package() -> None:
    source = (generate.PB_DIR / "parameter_server_pb2_grpc.py").read_text()
    assert "from ormo_ps.common.pb import parameter_server_pb2 as" in source
    assert not re.search(r"^import parameter_server_pb2", source, re.MULTILINE)


def test_stubs_import_from_another_directory(tmp_path: Path) -> None:
    # As once installed: the package is on sys.path, the working directory is elsewhere.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = (
        "from ormo_ps.common.pb import parameter_server_pb2 as pb, parameter_server_pb2_grpc as pb_grpc\n"
        "assert pb_grpc.ParameterServerStub and pb.Tensor.DESCRIPTOR.full_name == 'ps.v1.Tensor'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=60)
