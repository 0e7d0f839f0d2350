"""bench/harness.py and bench/processes.py, and that every benchmark imports as a module of the bench package."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

import pytest

import bench
from bench import harness, processes


def test_table_draws_a_markdown_table() -> None:
    assert harness.table(("a", "b"), [(1, "x"), (2.5, None)]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |"


def test_command_line_is_the_module_form_as_typed() -> None:
    assert harness.command_line("soak", ["--streams", "64", "--out", "a b"]) == \
        "python -m bench.soak --streams 64 --out 'a b'"


def test_run_meta_and_its_lines() -> None:
    meta = harness.run_meta("stability", []) | dict(seconds=12.3)
    assert meta["command"] == "python -m bench.stability"
    assert meta["date"].endswith("+00:00") and meta["cpus"] >= 1 and meta["machine"]
    first, second = harness.meta_lines(meta)
    assert first == "Command: `python -m bench.stability`  "
    assert f"{meta['cpus']} CPUs" in second and second.endswith("took 12 s.  ")


def test_save_writes_json_and_markdown(tmp_path: Path) -> None:
    md = harness.save(tmp_path / "deep" / "result", {"x": 1}, ["# Title", "", "text", ""])
    assert md == tmp_path / "deep" / "result.md"
    assert md.read_text() == "# Title\n\ntext\n"
    assert json.loads((tmp_path / "deep" / "result.json").read_text()) == {"x": 1}


def test_parser_adds_out_under_the_results_folder() -> None:
    p = harness.parser("update_cost", "First line.\n\n    python -m bench.update_cost", out="update_cost")
    assert p.prog == "python -m bench.update_cost" and p.description == "First line."
    assert p.parse_args([]).out == harness.RESULTS / "update_cost"
    assert not any(a.dest == "out" for a in harness.parser("x", "Doc.")._actions)


def test_prose_fills_its_placeholders() -> None:
    text = harness.prose("throughput_method", window_s="2 s", settle_s=0.3, cpus=2)
    assert "(2 s; after 0.3 s to settle;" in text and "(2 cores in all)" in text and "$" not in text


def test_wait_for_line_returns_the_match_and_fails_when_the_process_ends(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = processes.start("json.tool", ["--help"], log=log)  # any module: prints its usage and ends
    m = processes.wait_for_line(log, r"usage: python -m json\.tool", proc, 30)
    assert m.group(0).startswith("usage")
    proc.wait(30)
    with pytest.raises(RuntimeError, match="exited with 0"):
        processes.wait_for_line(log, "never printed", proc, 30)


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(bench.__path__, "bench.")
                                        if not m.name.endswith("__main__")))
def test_every_benchmark_imports_as_a_module(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # nothing may add to it
    for key in ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):  # bench.torch_rpc_ps sets them for its ranks
        monkeypatch.setenv(key, os.environ.get(key, "lo"))
    before = list(sys.path)
    importlib.import_module(name)
    assert sys.path == before


def test_the_transport_probe_echoes_whole_and_chunked_through_a_server_process(tmp_path: Path) -> None:
    from bench import transport_probe

    result = transport_probe.main(["--quick", "--out", str(tmp_path / "probe")])
    cells = {(r["chunk"], r["options"]) for r in result["results"]}
    assert cells == {(4_000_000, "defaults"), (4_000_000, "no BDP probing"), (1_000_000, "defaults")}
    assert all(r["per_second"] > 0 for r in result["results"])
    text = (tmp_path / "probe.md").read_text()
    assert "| 4 MB | 1 |" in text and "| 4 MB | whole |" in text
    assert not (tmp_path / "probe.server.log").exists()  # each echo server's log is removed after its cell


def test_the_step_cost_bench_times_every_step_of_the_servers_handling(tmp_path: Path) -> None:
    from bench import step_cost

    result = step_cost.main(["--sizes", "resnet20", "--repeats", "3", "--out", str(tmp_path / "steps")])
    row, = result["results"]
    assert set(row["ms"]) == set(step_cost.STEPS) and all(v > 0 for v in row["ms"].values())
    assert row["server_ms"] == pytest.approx(sum(row["ms"].values()))
    assert row["echo_ms"] == pytest.approx(row["ms"]["receive"] + row["ms"]["answer"])
    assert "| resnet20 |" in (tmp_path / "steps.md").read_text()
