"""Progress on the console: a bar on a terminal, elsewhere a line now and then with rate and time left; ps-sim
and ps-launch say what they are doing (decoding a data set, the final evaluation) instead of going silent."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ormo_ps.common.progress import Progress, duration
from ormo_ps.launcher.cli import _relay
from ormo_ps.sim.cli import main as sim_main
from tests.test_data import CIFAR10_CLASSES, _write_image_folder

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("ormo_ps.common.progress.time.monotonic", c)
    return c


def test_without_a_terminal_a_line_every_interval_with_rate_and_time_left(clock):
    out = io.StringIO()
    meter = Progress(1500, stream=out, interval=10.0)
    for i in range(0, 1501, 10):  # 100 it/s for 15 s
        meter.update(i, epoch=i / 100, loss=1.0 / (i + 1))
        clock.now += 0.1
    meter.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines  # at the start, after 10 s, and the last one
    assert lines[0] == "iter 0/1500 (0%) epoch 0.00 loss 1.0000"
    assert lines[1].startswith("iter 1000/1500 (67%) epoch 10.00 loss 0.0010 | 100.0 it/s, 0:10 elapsed, 0:05 left")
    assert lines[-1] == "iter 1500/1500 (100%) epoch 15.00 loss 0.0007 | 100.0 it/s, 0:15 elapsed, done"
    meter = Progress(1000, stream=(out := io.StringIO()), interval=10.0)
    meter.update(0)
    clock.now += 30  # waiting for workers: not in the rate
    meter.update(0)
    clock.now += 5
    meter.update(250)
    assert out.getvalue().splitlines()[-1] == "iter 250/1000 (25%) | 50.0 it/s, 0:35 elapsed, 0:15 left"


def test_a_report_on_another_clock_gives_the_rate_an_older_report_changes_nothing(clock):
    """ps-launch reports the server's counts with the server's uptime: polled once a second, exact times."""
    out = io.StringIO()
    meter = Progress(330, stream=out)
    meter.update(0, at=7.0, workers="4/4")
    meter.update(50, at=7.1)
    meter.update(40, at=7.05, loss=9.0)  # read after a newer status: ignored
    meter.show(test_acc=0.9)
    meter.update(330, at=7.8, loss=0.01)
    clock.now += 15
    meter.close()
    assert out.getvalue().splitlines()[-1] == \
        "iter 330/330 (100%) workers 4/4 test acc 0.9000 loss 0.0100 | 412.5 it/s, 0:15 elapsed, done"


def test_on_a_terminal_a_bar_and_messages_above_it():
    out = io.StringIO()
    with Progress(200, stream=out, bar=True) as meter:
        meter.update(50, loss=0.5)
        meter.write("eval epoch 1.00: test accuracy 0.9000")
        meter.phase("final evaluation", announce=True)
        meter.update(200, test_acc=0.95)
    text = out.getvalue()
    assert "eval epoch 1.00: test accuracy 0.9000\n" in text
    assert "200/200" in text and "test acc 0.9500" in text and "it/s" in text and "final evaluation" in text


@pytest.mark.parametrize("columns", [0, 100])
def test_a_terminal_of_no_width_gets_lines_not_an_invisible_bar(columns):
    """A pty that reports 0 columns (nobody sized it) makes tqdm draw nothing: lines are written there."""
    import fcntl
    import pty
    import struct
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with open(side, "w", closefd=True) as stream:
        meter = Progress(200, stream=stream)
        assert (meter._bar is not None) == (columns > 0)
        meter.update(100, loss=0.5)
        meter.close()
    text = os.read(main, 65536).decode()
    os.close(main)
    if columns:  # the bar (tqdm draws at most every 0.1 s: its count may lag)
        assert "train" in text and "/200 [" in text
    else:
        assert "iter 100/200" in text and "loss 0.5000" in text


def test_durations_read_as_a_clock():
    assert [duration(s) for s in (0, 42.4, 725, 3725)] == ["0:00", "0:42", "12:05", "1:02:05"]


def test_the_default_ps_sim_says_a_few_lines_not_one_per_record(tmp_path, capsys):
    """330 iterations and 30 evaluations once made 360 lines; now a header, a line every 10 s and the last."""
    sim_main(["--out", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ps-sim: ormo, K=4, mlp on digits, 330 iterations (30 epochs) on cpu")
    assert len(err) < 15, err
    assert re.search(r"iter 330/330 \(100%\) epoch 30\.00 loss \S+ test acc \S+ \| [\d.]+ it/s, \S+ elapsed, done",
                     err[-1]), err[-1]


def test_ps_launch_repeats_what_explains_a_silence_and_nothing_else():
    line = "2026-12-01 12:35:19,075 {} {} [server 127.0.0.1:5]: {}"
    assert _relay(line.format("INFO", "ormo_ps.common.data", "decoding 60 cifar10 images from /d (cached afterwards)")) \
        == "decoding 60 cifar10 images from /d (cached afterwards)"
    assert _relay(line.format("WARNING", "ormo_ps.common.data", "could not write cache /c")) == "could not write cache /c"
    assert _relay(line.format("INFO", "ormo_ps.server.service", "worker 0 registered")) is None
    assert _relay("ps-server listening on 127.0.0.1:5") is None


@pytest.mark.slow
def test_ps_launch_announces_decoding_and_the_final_evaluation_and_shows_rate(tmp_path):
    data = tmp_path / "cifar10"
    _write_image_folder(data, CIFAR10_CLASSES, {"train": 4, "test": 2})
    env = os.environ | {"PYTHONPATH": str(ROOT), "ORMO_PS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "ormo_ps.launcher.cli", "--dataset", "cifar10", "--data-dir", str(data),
                             "--model", "strided-cnn", "--batch-size", "8", "--epochs", "4", "--workers", "2",
                             "--out", str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    assert any(line.startswith("server: decoding 60 cifar10 images from") for line in err), err
    assert any("the evaluator evaluates the final parameters" in line for line in err), err
    assert re.search(r"iter 20/20 \(100%\) epoch 4\.00 .*test acc \S+ \| [\d.]+ it/s, \S+ elapsed, done", err[-1]), err
