"""One import name: `pip install .` (not editable) puts only `ormo_ps` at the top level of site-packages, and the
commands run from a directory that has a `server.py` and a `common/` of its own (a user's project)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the project installed from a copy of its tree, not editable. It sees this
    interpreter's packages (torch, grpc, ...: no download), not the project: pip builds and installs it anew."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here: pip cannot build the project without build isolation")
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                             "--no-build-isolation", "--no-index", "-q", str(ROOT)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return env_dir


def user_project(tmp_path: Path) -> Path:
    """A directory with modules of the names the project's parts had before they moved into ormo_ps."""
    (tmp_path / "server.py").write_text('raise SystemExit("the user\'s own server.py was imported")\n')
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text('raise SystemExit("the user\'s own common/ was imported")\n')
    return tmp_path


def run(env_dir: Path, cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("PS_")}
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_only_ormo_ps_is_installed_at_the_top_level(installed, tmp_path):
    site = next((installed / "lib").glob("python3*/site-packages"))
    tops = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))}
    assert "ormo_ps" in tops and not tops & {"common", "server", "worker", "sim", "launcher", "report"}
    assert (site / "ormo_ps" / "server" / "service.py").is_file()  # the parts inside the one name
    check = ("import importlib, sys\n"
             "for name in ('worker', 'sim', 'launcher', 'report'):\n"
             "    assert importlib.util.find_spec(name) is None, name\n"
             "import ormo_ps, ormo_ps.server.service\n"
             "from ormo_ps import RemoteOptimizer\n"
             "assert ormo_ps.__file__.startswith(sys.prefix), ormo_ps.__file__\n"
             "print(ormo_ps.server.service.__file__)")
    result = run(installed, user_project(tmp_path), str(installed / "bin" / "python"), "-c", check)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "site-packages/ormo_ps/server/service.py" in result.stdout


def test_ps_launch_runs_from_a_project_with_its_own_server_and_common(installed, tmp_path):
    project = user_project(tmp_path)
    result = run(installed, project, str(installed / "bin" / "ps-launch"), "--out", str(tmp_path / "run"),
                 "--epochs", "3", "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"final_test_accuracy"' in result.stdout.strip().splitlines()[-1]
