"""The run's configuration: one declaration per setting, and everything derived from it.

A setting added to RunConfig must reach every command, resume, ps-launch's server and the container files
with no other file touched: `test_a_new_setting_reaches_every_place_from_its_field_alone` adds one to a copy
of the sources and looks for it everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ormo_ps.common import settings
from ormo_ps.server.cli import cli as server_cli
from ormo_ps.server.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(workers=0), "workers must be >= 1, got 0"),
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(algo="adam"), "algo must be one of asgd, asgdm, dn, ormo"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(vanilla_sgd_step=True, algo="asgd"), "ablation"),
    (dict(lr_milestones=(3.0, 1.0)), "lr_milestones must be increasing"),
    (dict(dataset="synthetic", model=None, download="yes"), "download must be true or false"),
])
def test_a_bad_setting_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs)
    assert message in str(info.value)


def test_dict_and_flags_reproduce_the_run():
    run = RunConfig(algo="ormo-da", workers=16, lr=0.05, lr_milestones=(10.0, 20.0), iterations=500, seed=3,
                    download=True, allow_nonfinite=True, dataset="synthetic")
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == RunConfig.from_dict(run.to_dict())
    assert RunConfig.from_dict(run.to_dict()).to_dict() == run.to_dict()
    ctx = server_cli.make_context("ps-server", list(run.to_flags()))
    assert settings.pop_settings(RunConfig, dict(ctx.params)).to_dict() == run.to_dict()
    assert "--allow-nonfinite" in run.to_flags() and "--download" in run.to_flags()
    assert RunConfig().to_flags() == []  # defaults need no flag


def test_checkpoints_of_earlier_versions_still_resume():
    old = RunConfig(algo="asgd").to_dict()
    old.pop("allow_nonfinite")
    old |= {"reject_nonfinite": False, "lr_milestones": [5.0, 8.0]}  # as torch.load / json give them back
    run = RunConfig.from_dict(old)
    assert run.allow_nonfinite and run.lr_milestones == (5.0, 8.0)
    with pytest.raises(ValueError, match="unknown RunConfig settings: colour"):
        RunConfig.from_dict(RunConfig().to_dict() | {"colour": "red"})


def test_environment_variables_set_the_run(monkeypatch):
    monkeypatch.setenv("PS_LR", "0.25")
    monkeypatch.setenv("PS_LR_MILESTONES", "3,6")
    monkeypatch.setenv("PS_VANILLA_SGD_STEP", "true")
    monkeypatch.setenv("PS_MOMENTUM", "")  # empty: the default
    ctx = server_cli.make_context("ps-server", [], auto_envvar_prefix="PS")
    run = settings.pop_settings(RunConfig, dict(ctx.params))
    assert (run.lr, run.lr_milestones, run.vanilla_sgd_step, run.momentum) == (0.25, (3.0, 6.0), True, 0.9)
    monkeypatch.setenv("PS_MOMENTUM", "2")
    with pytest.raises(click.BadParameter) as bad:  # named by the variable the user set, not only the flag
        server_cli.make_context("ps-server", [], auto_envvar_prefix="PS")
    assert "'--momentum' (from PS_MOMENTUM)" in bad.value.format_message()
    with pytest.raises(click.BadParameter) as bad:
        server_cli.make_context("ps-server", ["--momentum", "2"], auto_envvar_prefix="PS")
    assert "PS_MOMENTUM" not in bad.value.format_message()


@pytest.mark.slow
def test_a_new_setting_reaches_every_place_from_its_field_alone(tmp_path):
    """One field added to server/config.py in a copy of the sources, nothing else changed: every command
    takes it (flag and PS_ variable), ps-launch hands it to its server, a checkpoint keeps it, and the
    container files list it once regenerated."""
    copy = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in ("ormo_ps", "common", "server", "worker", "sim", "launcher", "report", "deploy"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    shutil.copy(ROOT / "docker-compose.yml", copy / "docker-compose.yml")
    config = copy / "server" / "config.py"
    source = config.read_text()
    anchor = '    allow_nonfinite: bool = setting(False, "Apply NaN/Inf gradients instead of rejecting them.")\n'
    assert anchor in source
    config.write_text(source.replace(anchor, anchor + '    new_knob: float = setting(0.5, "A knob added by the '
                                     'test.", min=0)\n'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONPATH": str(copy)}

    def run(*argv: str, **extra_env: str) -> str:
        done = subprocess.run([sys.executable, *argv], cwd=copy, env=env | extra_env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    for module in ("ormo_ps.server.cli", "ormo_ps.sim.cli", "ormo_ps.launcher.cli"):
        assert "--new-knob" in run("-m", module, "--help"), module
    probe = (
        "import json, sys\n"
        "from ormo_ps.common import settings\n"
        "from ormo_ps.server.cli import cli\n"
        "from ormo_ps.server.config import RunConfig\n"
        "run = RunConfig(new_knob=2.0)\n"
        "flags = run.to_flags()\n"  # what ps-launch hands its ps-server
        "from_flags = settings.pop_settings(RunConfig, dict(cli.make_context('ps-server', list(flags)).params))\n"
        "from_env = settings.pop_settings(RunConfig, dict(cli.make_context('ps-server', [], "
        "auto_envvar_prefix='PS').params))\n"
        "resumed = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))\n"  # a checkpoint's run
        "print(json.dumps([flags, from_flags.new_knob, from_env.new_knob, resumed.new_knob]))\n"
    )
    flags, from_flags, from_env, resumed = json.loads(run("-c", probe, PS_NEW_KNOB="3"))
    assert flags == ["--new-knob", "2.0"] and (from_flags, from_env, resumed) == (2.0, 3.0, 2.0)
    run("deploy/environment.py")
    assert "PS_NEW_KNOB: ${PS_NEW_KNOB:-}" in (copy / "docker-compose.yml").read_text()
    assert "\nPS_NEW_KNOB=\n" in (copy / "deploy" / "k8s" / "run.env").read_text()
