"""The layers of docs/architecture.md, enforced: which part may import which, from the sources (every import
statement, function bodies included, and `importlib.import_module("...")` with a literal name) and at run time
(each part's modules imported in a fresh interpreter, and the project modules that got loaded listed)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed parts, ormo_ps.<name> (setup.cfg's package_dir maps them from the top-level folders).
SUBPACKAGES = {"common", "server", "worker", "sim", "launcher", "report"}
# Each part may import itself and these; nothing else of the project. "ormo_ps" is the public API's own module.
ALLOWED = {
    "common": set(),
    "server": {"common"},
    "worker": {"common"},
    "sim": {"common", "server"},
    "launcher": {"common", "server"},
    "report": {"common", "server"},
    "ormo_ps": {"common", "worker"},  # the public API: a thin layer over the client side
    "examples": {"ormo_ps"},  # what a user writes: the public API only
    "deploy": {"common", "server", "worker", "sim", "launcher", "report"},  # the container and cluster tooling
    "bench": {"ormo_ps", *SUBPACKAGES},  # anything installed, nothing of the tests but their helpers
}
FOLDERS = {"ormo_ps": ROOT / "ormo_ps", **{name: ROOT / name for name in ALLOWED if name != "ormo_ps"}}


def part_of(module: str) -> str | None:
    """The part a module name belongs to (None: not the project's); `old:NAME` for a pre-ormo_ps name."""
    parts = module.split(".")
    if parts[0] == "ormo_ps":
        return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "ormo_ps"
    if parts[0] in SUBPACKAGES:
        return f"old:{parts[0]}"
    if parts[0] in ("bench", "examples", "tests"):
        return parts[0]
    return None


def imported_names(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def sources(part: str) -> list[Path]:
    folder = FOLDERS[part]
    return sorted(folder.glob("*.py") if part == "ormo_ps" else folder.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_a_part_imports_only_the_layers_below_it(part):
    for path in sources(part):
        parts = {part_of(n) for n in imported_names(path)} - {None}
        wrong = parts - ALLOWED[part] - {part}
        if part == "bench":
            wrong -= {"tests"}  # the benchmarks use the tests' helpers (a proxy, a small disk)
        assert not wrong, f"{path.relative_to(ROOT)} imports {', '.join(sorted(wrong))}: see docs/architecture.md"


def test_no_code_imports_the_old_top_level_names():
    """Installed, only ormo_ps is at the top level: `import server` would find a user's own server.py."""
    for folder in ("common", "server", "worker", "sim", "launcher", "report", "ormo_ps", "bench", "examples",
                   "deploy", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            old = sorted(n for n in imported_names(path) if (part_of(n) or "").startswith("old:"))
            assert not old, f"{path.relative_to(ROOT)} imports {', '.join(old)}: use ormo_ps.{old[0]}"


_LOADED = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("ormo_ps.", "bench.", "examples.")))))
"""


@pytest.mark.parametrize("part", sorted(SUBPACKAGES))
def test_at_run_time_a_part_loads_only_the_layers_below_it(part):
    """Every module of the part imported in a fresh interpreter: what else of the project got loaded."""
    names = []
    for path in sources(part):
        rel = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(("ormo_ps", *(rel[:-1] if rel[-1] == "__init__" else rel))))
    out = subprocess.run([sys.executable, "-c", _LOADED, *names], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = {part_of(m) for m in json.loads(out.stdout.strip().splitlines()[-1])} - {None}
    wrong = loaded - ALLOWED[part] - {part, "ormo_ps"}  # (the package's own __init__ loads with any part)
    assert not wrong, f"importing ormo_ps.{part} loads {', '.join(sorted(wrong))}: see docs/architecture.md"
