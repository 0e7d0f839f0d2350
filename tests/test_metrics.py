"""metrics.jsonl: one clock per file, whoever appends to it."""

from __future__ import annotations

import time

from ormo_ps.common.metrics import MetricsWriter, read_metrics


def test_a_writer_appending_to_a_file_goes_on_with_the_files_clock(tmp_path):
    """The server writes first, the evaluator (another process, started later) appends: wall_time and timestamp
    only grow down the file, and wall_time counts from the file's first record."""
    path = tmp_path / "metrics.jsonl"
    server = MetricsWriter(path)
    server.write("start", source="server")
    time.sleep(0.3)
    server.write("progress", iteration=1)
    evaluator = MetricsWriter(path, mode="a")  # opened now: its own clock would start at 0
    time.sleep(0.1)
    server.write("summary", iterations=1)
    evaluator.write("eval", iteration=1)
    server.close()
    evaluator.close()
    records = read_metrics(path)
    assert [r["event"] for r in records] == ["start", "progress", "summary", "eval"]
    for key in ("wall_time", "timestamp"):
        values = [r[key] for r in records]
        assert values == sorted(values), (key, values)
    assert records[-1]["wall_time"] >= 0.4
    assert abs((records[-1]["timestamp"] - records[0]["timestamp"]) - records[-1]["wall_time"]) < 0.01


def test_a_fresh_or_unreadable_file_starts_its_own_clock(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("not json\n")
    with MetricsWriter(path, mode="a") as writer:
        record = writer.write("start")
    assert 0 <= record["wall_time"] < 1
    with MetricsWriter(tmp_path / "new.jsonl", mode="a") as writer:
        assert 0 <= writer.write("start")["wall_time"] < 1
