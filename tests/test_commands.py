"""What a user finds out from the commands themselves: the PS_* variables in --help, a warning for a variable no
command reads, --version, one naming of the same setting across commands, the server's address in log lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest

from ormo_ps.common.cli_options import env_names
from ormo_ps.common.metrics import read_metrics
from ormo_ps.launcher.cli import cli as launch_cli
from ormo_ps.launcher.cli import main as launch_main
from ormo_ps.report.runs import find_runs
from ormo_ps.report.cli import main as plot_main
from ormo_ps.server.cli import cli as server_cli
from ormo_ps.server.cli import main as server_main
from ormo_ps.sim.cli import cli as sim_cli
from ormo_ps.sim.cli import main as sim_main
from ormo_ps.worker.cli import cli as worker_cli
from ormo_ps.worker.cli import main as worker_main
from ormo_ps.worker.evaluator import cli as eval_cli
from ormo_ps.worker.evaluator import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
MAINS = {"ps-server": server_main, "ps-worker": worker_main, "ps-eval": eval_main, "ps-launch": launch_main,
         "ps-sim": sim_main, "ps-plot": plot_main}


def option(command: click.Command, name: str) -> click.Option:
    (found,) = [p for p in command.params if isinstance(p, click.Option) and p.name == name]
    return found


@pytest.mark.parametrize(("prog", "variable"), [("ps-server", "PS_START_WHEN_ALL"), ("ps-server", "PS_OUT"),
                                                ("ps-worker", "PS_SERVER"), ("ps-eval", "PS_EVAL_EVERY"),
                                                ("ps-launch", "PS_SLOW_WORKERS"), ("ps-sim", "PS_SLOWDOWN")])
def test_help_names_each_options_variable(prog, variable, capsys):
    MAINS[prog](["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # click wraps long lines
    assert f"env var: {variable}" in help_text


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_every_command_has_version(prog, capsys):
    MAINS[prog](["--version"])
    assert capsys.readouterr().out.strip() == f"{prog} {metadata.version('ormo-ps')}"


def test_a_misspelt_or_former_variable_is_a_warning_and_another_commands_is_not(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PS_OUTT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PS_OUT_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PS_WAIT_FOR_ALL", "1")
    monkeypatch.setenv("PS_SERVER", "127.0.0.1:1")  # ps-worker's: a shell shared by several commands has it
    sim_main(["--iterations", "2", "--out", str(tmp_path), "-q", "--eval-every", "0"])
    err = capsys.readouterr().err
    assert "ps-sim: warning: ignoring PS_OUTT: no ps-* command reads it (did you mean PS_OUT" in err
    assert "ignoring PS_OUT_DIR: no ps-* command reads it (it is now PS_OUT)" in err
    assert "ignoring PS_WAIT_FOR_ALL: no ps-* command reads it (it is now PS_START_WHEN_ALL)" in err
    assert "PS_SERVER" not in err


def test_out_and_start_when_all_read_the_names_a_user_guesses():
    for command in (server_cli, launch_cli, sim_cli, eval_cli):
        assert "PS_OUT" in env_names(command), command.name
    assert "PS_START_WHEN_ALL" in env_names(server_cli)
    assert not [n for n in env_names(worker_cli) | env_names(launch_cli) if n in ("PS_OUT_DIR", "PS_WAIT_FOR_ALL")]


def test_launch_and_sim_name_slow_workers_and_evaluations_alike():
    for name in ("slow_workers", "slowdown"):
        launched, simulated = option(launch_cli, name), option(sim_cli, name)
        assert launched.opts == simulated.opts and launched.default == simulated.default, name
        assert launched.help == simulated.help, name
    assert option(launch_cli, "eval_every").default == option(sim_cli, "eval_every").default \
        == option(eval_cli, "eval_every").default == 1.0
    assert not any(p.hidden is False and p.name in ("slow_fraction", "slow_factor") for p in sim_cli.params)


def test_ps_sims_former_slow_flags_still_work(tmp_path, capsys):
    sim_main(["--workers", "4", "--slow-fraction", "0.5", "--slow-factor", "3", "--iterations", "4", "--out",
              str(tmp_path), "-q", "--eval-every", "0"])
    assert "--slow-fraction is now --slow-workers" in capsys.readouterr().err
    start = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert start["slow_workers"] == [2, 3] and start["timing"]["slowdown"] == 3.0


def test_a_workers_log_lines_name_the_server_it_tries():
    result = subprocess.run([sys.executable, "-m", "ormo_ps.worker.cli", "--server", "127.0.0.1:1", "--server-timeout", "1"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert lines and all("[server 127.0.0.1:1]" in line for line in lines), result.stderr


@pytest.mark.slow
def test_ps_launchs_own_variables_reach_its_processes_as_flags_only(tmp_path, capsys, monkeypatch):
    """PS_SLOWDOWN set for ps-launch slows its slow workers, not every worker (which read PS_SLOWDOWN too)."""
    monkeypatch.setenv("PS_SLOWDOWN", "8")
    launch_main(["--workers", "3", "--slow-workers", "1", "--iterations", "30", "--out", str(tmp_path), "-q",
                 "--timeout", "300"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 30
    slowdowns = sorted(re.findall(r"slowdown (\d+\.\d+)", (tmp_path / "server.log").read_text()))
    assert slowdowns == ["1.00", "1.00", "8.00"]
    (run,) = find_runs([tmp_path])  # ps-plot learns of the slow worker from launch.json
    assert (run.setting, run.slow) == ("het.", (1, 8.0))
