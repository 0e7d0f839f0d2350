"""What every benchmark does with its results: where they go, what a run records, the files, the tables.

A benchmark is a module `bench/NAME.py` (or a package `bench/NAME/`) run from the repository root as
`python -m bench.NAME`. It builds its parser with `parser()`, records `run_meta()` with its results,
starts its Markdown with `meta_lines()`, draws tables with `table()`, takes hand-written text from
bench/prose/ with `prose()`, and writes both files with `save()`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROSE = REPO / "bench" / "prose"


def parser(name: str, doc: str, out: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's argument parser: the docstring's first line, its examples in --help, and `--out`
    (default: bench/results/OUT) when `out` is given."""
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=first, epilog=rest.strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is not None:
        p.add_argument("--out", type=Path, default=RESULTS / out,
                       help=f"where the results go (default: bench/results/{out})")
    return p


def command_line(name: str, argv: Sequence[str] | None = None) -> str:
    """The command as typed: `python -m bench.NAME` and the arguments (`argv`, or this process's)."""
    return shlex.join(["python", "-m", f"bench.{name}", *(sys.argv[1:] if argv is None else argv)])


def git(*args: str) -> str:
    """`git ARGS` in the repository, its output stripped ("" where git fails)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def processor() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(name: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What every result records: the command line, the UTC date, the machine, its CPUs, the commit
    ($ORMO_PS_COMMIT where set, else git's HEAD: a lent GPU machine's copy of the tree carries a .git of the
    session's start, whose HEAD is not the commit that ran)."""
    return dict(command=command_line(name, argv), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=platform.platform(), processor=processor(), cpus=os.cpu_count(),
                commit=os.environ.get("ORMO_PS_COMMIT") or git("rev-parse", "--short", "HEAD"))


def meta_lines(meta: dict[str, Any]) -> list[str]:
    """The first lines of a report under its title: command, date, machine, commit, and `seconds` if recorded."""
    took = f"; took {meta['seconds']:.0f} s" if "seconds" in meta else ""
    return [f"Command: `{meta['command']}`  ",
            f"Date: {meta['date']}; machine: {meta['machine']} ({meta['processor']}, {meta['cpus']} CPUs); "
            f"commit {meta['commit'] or 'unknown'}{took}.  "]


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one row per sequence of cells (any value; str() of it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def prose(name: str, **values: Any) -> str:
    """Hand-written text of a report, bench/prose/NAME.md, with `$name` placeholders filled from `values`."""
    text = (PROSE / f"{name}.md").read_text().strip()
    return Template(text).substitute(values) if values else text


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, **dumps) + "\n")


def write_markdown(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def save(out: Path, result: Any, lines: Iterable[str], **dumps: Any) -> Path:
    """Write OUT.json (the result) and OUT.md (the lines); returns the Markdown file's path."""
    write_json(out.with_suffix(".json"), result, **dumps)
    write_markdown(out.with_suffix(".md"), lines)
    return out.with_suffix(".md")
