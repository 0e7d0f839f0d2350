"""The layers of docs/architecture.md, enforced: which package may import which (from the sources' imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"common", "server", "worker", "sim", "launcher", "report", "bench", "ormo_ps", "examples"}
# Each package may import itself and these; nothing else of the project.
ALLOWED = {
    "common": set(),
    "server": {"common"},
    "worker": {"common"},
    "sim": {"common", "server"},
    "launcher": {"common", "server"},
    "report": {"common", "server"},
    "ormo_ps": {"common", "worker"},  # the public API: a thin layer over the client side
    "examples": {"ormo_ps"},  # what a user writes: the public API only
}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & PROJECT
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = project_imports(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {', '.join(sorted(wrong))}: see docs/architecture.md"
