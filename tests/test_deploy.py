"""Container and cluster files, checked without Docker or a cluster.

The compose file against the Compose specification, the Kubernetes manifests against the Kubernetes
schemas and kustomize, the Dockerfile with hadolint; every command and PS_* variable they name exists in
the package (a misspelt variable is silently ignored by click, so only a test catches it); and the compose
services' commands, run with their environment as local processes, train to the end. The same for the
sharded variants: deploy/compose.sharded.yml (added to docker-compose.yml) and the kustomize component
deploy/k8s/sharded with its overlay deploy/k8s-sharded.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from ormo_ps.common.observe import METRICS_PATTERN
from ormo_ps.server.serving import LISTENING_PATTERN
from tests.logged_process import LoggedProcess

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s"
SHARDED_COMPOSE = ROOT / "deploy" / "compose.sharded.yml"  # docker compose -f docker-compose.yml -f this
K8S_SHARDED = K8S / "sharded"  # the kustomize Component
K8S_SHARDED_OVERLAY = ROOT / "deploy" / "k8s-sharded"  # deploy/k8s with the Component (kubectl apply -k)
SHARD_SCRIPT = "ps-shard"
K8S_VERSION = "1.30.0"  # native gRPC probes are GA since 1.27
APP_DIR = "/app"  # where the Dockerfile puts the sources (WORKDIR /app)
ENV_PREFIX = "PS"
PROMETHEUS = ROOT / "deploy" / "prometheus"
METRICS_PORT = "9190"  # every container's metrics port
METRICS_HERE = {"PS_METRICS_PORT": "0", "PS_METRICS_HOST": "127.0.0.1"}  # the same services as local processes


# ----- helpers ------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """Path of a command-line tool from the test extra; skip with the reason when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]' (setup.cfg's test extra)")
    return found


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> 'module:function'."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


def click_command(script: str) -> click.Command:
    module, _, function = console_scripts()[script].partition(":")
    mod = importlib.import_module(module)
    assert function == "main" and isinstance(mod.cli, click.Command), f"{script}: expected {module}.cli"
    return mod.cli


def env_option(command: click.Command, name: str) -> click.Option | None:
    """The option of `command` that the environment variable `name` sets (click's auto_envvar_prefix)."""
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        if param.envvar:
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            if name in names:
                return param
        elif param.allow_from_autoenv and param.name and f"{ENV_PREFIX}_{param.name.upper()}" == name:
            return param
    return None


_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
                  r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$) on strings."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        got = env.get(name)
        if m.group("op") == ":-" and not got:
            return m.group("default")
        if m.group("op") == "-" and got is None:
            return m.group("default")
        return got or ""

    out = _VAR.sub(sub, value)
    assert "${" not in out, f"unsupported interpolation in {value!r}"
    return out


def compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml with YAML merge keys resolved and variables interpolated (defaults when env is empty)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def merge(base: object, override: object) -> object:
    """Compose's merge of a later file into an earlier one, as far as deploy/compose.sharded.yml uses it:
    mappings merge key by key, anything else is replaced (test_sharded_compose_merges_as_docker_compose_does
    compares it with `docker compose config`)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override}
    return override


def compose_sharded(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml with deploy/compose.sharded.yml merged in, as `docker compose -f ... -f ...` reads them."""
    return interpolate(merge(yaml.safe_load(COMPOSE.read_text()), yaml.safe_load(SHARDED_COMPOSE.read_text())),
                       env or {})


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[dict]:
    return [doc for path in k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


@dataclass
class Container:
    where: str
    command: list[str]
    env: dict[str, str]
    spec: dict


def config_maps() -> dict[str, dict[str, str]]:
    """The ConfigMaps kustomization.yaml generates, by name: their keys and values (env files)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    maps = {}
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            for line in (K8S / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    name, _, value = line.partition("=")
                    data[name.strip()] = value
        maps[generator["name"]] = data
    return maps


def k8s_containers() -> list[Container]:
    found = []
    maps = config_maps()
    for obj in k8s_objects():
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for c in pod.get("initContainers", []) + pod["containers"]:
            env = {}
            for source in c.get("envFrom", []):  # the explicit env below wins, as in Kubernetes
                env |= maps[source["configMapRef"]["name"]]
            env |= {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}
            found.append(Container(f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}",
                                   list(c.get("command", [])) + list(c.get("args", [])), env, c))
    return found


def compose_containers(doc: dict | None = None) -> list[Container]:
    doc = doc or compose()
    return [Container(f"compose service {name}", list(svc["command"]), service_env(svc), svc)
            for name, svc in doc["services"].items()]


def kustomize(path: Path) -> list[dict]:
    """The objects `kubectl kustomize PATH` renders (what `kubectl apply -k PATH` sends)."""
    rendered = run_tool(tool("kubectl"), "kustomize", str(path))
    assert rendered.returncode == 0, rendered.stderr
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def rendered_containers(objects: list[dict]) -> list[Container]:
    """k8s_containers() of rendered objects: the ConfigMaps are the rendered ones (names with their hash)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    found = []
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for c in pod.get("initContainers", []) + pod["containers"]:
            env = {}
            for source in c.get("envFrom", []):
                env |= maps[source["configMapRef"]["name"]]
            env |= {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}
            found.append(Container(f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}",
                                   list(c.get("command", [])) + list(c.get("args", [])), env, c))
    return found


def sharded_containers() -> list[Container]:
    """Every container of the sharded variants: the merged compose files and the rendered overlay."""
    return compose_containers(compose_sharded()) + rendered_containers(kustomize(K8S_SHARDED_OVERLAY))


def app_file(argv: list[str]) -> Path | None:
    """The repository file that `python /app/...` runs in the image, or None if argv is not such a command."""
    if len(argv) >= 2 and argv[0] == "python" and argv[1].startswith(APP_DIR + "/"):
        return ROOT / argv[1][len(APP_DIR) + 1:]
    return None


def job(name: str) -> dict:
    (obj,) = [o for o in k8s_objects() if o["kind"] == "Job" and o["metadata"]["name"] == name]
    return obj


def k8s_env(obj: dict, container: int = 0) -> dict[str, str]:
    c = obj["spec"]["template"]["spec"]["containers"][container]
    env = {}
    for source in c.get("envFrom", []):
        env |= config_maps()[source["configMapRef"]["name"]]
    return env | {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}


# ----- validators --------------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification():
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_manifests_follow_the_kubernetes_schemas():
    files = [str(p) for p in k8s_files()]
    assert files
    result = run_tool(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(k8s_objects()), result.stdout


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_files())
    images = {c.spec["image"].split(":")[0] for c in k8s_containers()}
    assert images == {i["name"] for i in kustomization["images"]}


def test_kustomize_renders_valid_manifests(tmp_path):
    """What `kubectl apply -k deploy/k8s` would send: it renders, and it passes the schemas too."""
    rendered = run_tool(tool("kubectl"), "kustomize", str(K8S))
    assert rendered.returncode == 0, rendered.stderr
    objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    generated = [(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0]) for o in objects if o["kind"] == "ConfigMap"]
    assert generated == [("ConfigMap", name) for name in config_maps()]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "ConfigMap") == sorted(
        (o["kind"], o["metadata"]["name"]) for o in k8s_objects())
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = run_tool(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(out))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = run_tool(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


# ----- the image ---------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus `**`, as Docker reads them)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context."""
    excluded = False
    parts = path.strip("/").split("/")
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip().strip("/"))
        # a pattern matching a folder excludes what is in it; the last matching line wins
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_image_installs_the_package_and_runs_as_a_user():
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # the image's torch is the one setup.cfg pins
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"]
    assert f"torch=={args['TORCH_VERSION']}" in requires and f"torchvision=={args['TORCHVISION_VERSION']}" in requires
    # every package setup.cfg installs is copied, from a path that exists and the context keeps
    copied = {src.rstrip("/") for k, v in instructions if k == "COPY" for src in v.split()[:-1]}
    # (package_dir maps ormo_ps.<part> to the top-level folder <part>)
    packages = {line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines()}
    assert packages <= copied, f"Dockerfile misses COPY for {sorted(packages - copied)}"
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src), f".dockerignore excludes {src}, which the Dockerfile copies"
    # the health probe is where compose and the manifests run it
    assert ("COPY", "deploy/healthcheck.py deploy/healthcheck.py") in instructions
    assert ("WORKDIR", APP_DIR) in instructions
    assert any(k == "ENV" and "PYTHONUNBUFFERED=1" in v for k, v in instructions)
    # the final user is a number (Kubernetes' runAsNonRoot checks numbers) and not root
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], [v for k, v in instructions if k == "USER"][-1])
    assert int(user.split(":")[0]) > 0, user
    assert "CMD" in kinds and "ENTRYPOINT" not in kinds  # compose and the manifests pick the role by command


def test_dockerignore_keeps_data_results_and_caches_out():
    for path in (".git", "runs", "runs/launch/checkpoint.pt", "data/cifar10/x.png", "tests", ".pytest_cache",
                 "common/__pycache__/codec.cpython-311.pyc", ".hypothesis", "ormo_ps.egg-info"):
        assert dockerignored(path), path
    for path in ("setup.cfg", "common/codec.py", "deploy/healthcheck.py"):
        assert not dockerignored(path), path


# ----- commands and variables --------------------------------------------------------------------
def test_every_command_exists_in_the_package():
    scripts = console_scripts()
    commands = compose_containers() + k8s_containers() + sharded_containers()
    assert commands
    for c in commands:
        assert c.command, f"{c.where}: give the command explicitly (the image's CMD is the server's)"
        script = app_file(c.command)
        if script is not None:
            assert script.is_file(), f"{c.where}: {c.command[1]} is not in the repository"
        else:
            assert c.command[0] in scripts, f"{c.where}: {c.command[0]} is not a console script of setup.cfg"
            click_command(c.command[0]).make_context(c.command[0], c.command[1:], resilient_parsing=True)
    health = compose()["services"]["server"]["healthcheck"]["test"]
    assert health[0] == "CMD" and app_file(health[1:]) == ROOT / "deploy" / "healthcheck.py"


def test_every_ps_variable_is_an_option_of_its_command():
    """Each PS_* variable names an option of that role's command, and its value (with the defaults) parses."""
    checked = 0
    for c in compose_containers() + k8s_containers() + sharded_containers():
        names = [n for n in c.env if n.startswith(ENV_PREFIX + "_")]
        if app_file(c.command) is not None:
            assert set(names) <= {"PS_BIND"}, f"{c.where}: the health probe reads only PS_BIND"
            continue
        command = click_command(c.command[0])
        ctx = click.Context(command, auto_envvar_prefix=ENV_PREFIX)
        for name in names:
            option = env_option(command, name)
            assert option is not None, f"{c.where}: {name} is no option of {c.command[0]}"
            if c.env[name]:  # empty means "the command's default" (click ignores empty variables)
                option.type_cast_value(ctx, c.env[name])
            checked += 1
    assert checked >= 20


def test_empty_variables_fall_back_to_defaults(monkeypatch):
    """The compose file passes unset knobs as empty strings: click must treat them as absent."""
    command = click_command("ps-server")
    monkeypatch.setenv("PS_EPOCHS", "")
    monkeypatch.setenv("PS_WORKERS", "7")
    ctx = command.make_context("ps-server", [], auto_envvar_prefix=ENV_PREFIX)
    assert ctx.params["epochs"] == 30.0 and ctx.params["workers"] == 7


def test_worker_counts_and_addresses_agree():
    # compose: the default replicas add up to the K the server waits for, with the same default
    doc = compose()
    services = doc["services"]
    server_env = service_env(services["server"])
    k = int(server_env["PS_WORKERS"])
    assert k == 64
    assert int(services["worker"]["deploy"]["replicas"]) + int(services["slow-worker"]["deploy"]["replicas"]) == k
    assert compose({"PS_WORKERS": "16"})["services"]["worker"]["deploy"]["replicas"] == "16"
    assert service_env(compose({"PS_WORKERS": "16"})["services"]["server"])["PS_WORKERS"] == "16"
    port = server_env["PS_BIND"].rsplit(":", 1)[1]
    for name in ("worker", "slow-worker", "evaluator"):
        env = service_env(services[name])
        assert env["PS_SERVER"] == f"server:{port}", name
        assert env["PS_DATA_DIR"] == server_env["PS_DATA_DIR"], name
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy", name
    assert service_env(services["slow-worker"])["PS_SLOWDOWN"] == "4"
    assert service_env(compose({"PS_SLOWDOWN": "8"})["services"]["slow-worker"])["PS_SLOWDOWN"] == "8"
    assert "PS_SLOWDOWN" not in service_env(services["worker"])
    # kubernetes: the same, with the Service as the address
    server = job("ps-server")
    env = k8s_env(server)
    k = int(env["PS_WORKERS"])
    assert job("ps-worker")["spec"]["parallelism"] + job("ps-slow-worker")["spec"]["parallelism"] == k == 64
    (service,) = [o for o in k8s_objects() if o["kind"] == "Service"]
    svc_port = service["spec"]["ports"][0]["port"]
    assert env["PS_BIND"] == f"0.0.0.0:{svc_port}"
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    for name in ("ps-worker", "ps-slow-worker", "ps-eval"):
        assert k8s_env(job(name))["PS_SERVER"] == f"{service['metadata']['name']}:{svc_port}", name
        assert k8s_env(job(name))["PS_DATA_DIR"] == env["PS_DATA_DIR"], name
    assert k8s_env(job("ps-slow-worker"))["PS_SLOWDOWN"] == "4"
    assert "PS_SLOWDOWN" not in k8s_env(job("ps-worker"))
    # one shared token (optional) for every role that talks to the server or serves a shard
    for c in compose_containers() + k8s_containers() + sharded_containers():
        if app_file(c.command) is None:
            assert "PS_TOKEN" in c.env, c.where
    token_refs = {json.dumps(e["valueFrom"]["secretKeyRef"], sort_keys=True)
                  for c in k8s_containers() + sharded_containers() for e in c.spec.get("env", [])
                  if e["name"] == "PS_TOKEN"}
    assert len(token_refs) == 1 and json.loads(token_refs.pop())["optional"] is True


def test_k8s_server_is_probed_over_grpc_and_data_is_read_only():
    image_uid = int(dict(v.split("=", 1) for k, v in dockerfile_instructions() if k == "ARG" and "=" in v)["APP_UID"])
    server = job("ps-server")["spec"]["template"]["spec"]["containers"][0]
    port = server["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == port, probe
    for obj in k8s_objects():
        if obj["kind"] != "Job":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == image_uid  # the image's user owns /data and /runs
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", [])}
        assert claims["data"]["claimName"] == "ps-data" and claims["data"]["readOnly"] is True
        for c in pod["containers"]:
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            assert mounts["data"]["mountPath"] == "/data" and mounts["data"]["readOnly"] is True
            if "runs" in mounts:
                assert claims["runs"]["claimName"] == "ps-runs" and mounts["runs"]["mountPath"] == "/runs"


def test_every_role_serves_metrics_where_prometheus_finds_them():
    """compose: every service on port 9190 of its container, on its addresses (the server through PS_BIND, the
    others through PS_METRICS_HOST), the server's published on the host's loopback only, and the scrape
    configuration names those services and that port; kubernetes: every pod carries the prometheus.io
    annotations with the port its container serves on."""
    services = compose()["services"]
    for name in ("server", "worker", "slow-worker", "evaluator"):
        env = service_env(services[name])
        assert env["PS_METRICS_PORT"] == METRICS_PORT, name
        host = env.get("PS_METRICS_HOST") or env["PS_BIND"].rsplit(":", 1)[0]
        assert host == "0.0.0.0", name
    assert services["server"]["ports"] == [f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}"]
    assert compose({"ORMO_METRICS_PORT": "9999"})["services"]["server"]["ports"] == [f"127.0.0.1:9999:{METRICS_PORT}"]
    scrape = yaml.safe_load((PROMETHEUS / "compose.yml").read_text())["scrape_configs"]
    addresses = {t for job in scrape for c in job.get("static_configs", []) for t in c["targets"]}
    addresses |= {f"{n}:{c['port']}" for job in scrape for c in job.get("dns_sd_configs", []) for n in c["names"]}
    assert addresses == {f"{name}:{METRICS_PORT}" for name in ("server", "worker", "slow-worker", "evaluator")}
    for obj in k8s_objects():
        if obj["kind"] != "Job":
            continue
        pod = obj["spec"]["template"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        env = k8s_env(obj)
        assert annotations["prometheus.io/port"] == env["PS_METRICS_PORT"] == METRICS_PORT, obj["metadata"]["name"]
        assert (env.get("PS_METRICS_HOST") or env["PS_BIND"].rsplit(":", 1)[0]) == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == int(METRICS_PORT)


def test_the_prometheus_configurations_pass_promtool():
    configs = sorted(PROMETHEUS.glob("*.yml"))
    assert [p.name for p in configs] == ["compose.yml", "local.yml"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it comes with Prometheus; Debian: apt-get install prometheus)")
    result = run_tool(promtool, "check", "config", *map(str, configs))
    assert result.returncode == 0, result.stdout + result.stderr


# ----- the sharded variants ------------------------------------------------------------------------
def shard_services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if svc["command"][0] == SHARD_SCRIPT}


def test_sharded_compose_file_follows_the_compose_specification():
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(SHARDED_COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_sharded_compose_merges_as_docker_compose_does():
    """`docker compose -f docker-compose.yml -f deploy/compose.sharded.yml config` accepts the pair, and what it
    makes of them is what these tests check (merge() above): the services, their commands and environments."""
    docker = shutil.which("docker")
    if docker is None or run_tool(docker, "compose", "version").returncode != 0:
        pytest.skip("no `docker compose` here (deploy/docker-host.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX + "_") and not k.startswith("COMPOSE_")}
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "-f", str(SHARDED_COMPOSE), "config", "--format",
                           "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)["services"]
    ours = compose_sharded()["services"]
    assert sorted(theirs) == sorted(ours)
    for name, svc in ours.items():
        assert theirs[name]["command"] == svc["command"], name
        assert service_env(theirs[name]) == service_env(svc), name
        assert {k: v["condition"] for k, v in theirs[name].get("depends_on", {}).items()} == {
            k: v["condition"] for k, v in svc.get("depends_on", {}).items()}, name
        assert theirs[name].get("healthcheck", {}).get("test") == svc.get("healthcheck", {}).get("test"), name


def test_sharded_compose_shards_and_server_agree():
    """The server is told every shard service, in order, at the port it binds, and waits until each is healthy;
    every shard mounts the run's volume where the server writes (the server names the shards' checkpoint
    paths, the shards write them); the health probe asks the name ps-shard registers; the rest is the default's."""
    sharded, default = compose_sharded(), compose()
    shards = shard_services(sharded)
    assert list(shards) == [f"shard-{i}" for i in range(len(shards))] and len(shards) >= 2
    assert not shard_services(default)
    server, server_env = sharded["services"]["server"], service_env(sharded["services"]["server"])
    assert "PS_SHARD_ADDRESSES" not in service_env(default["services"]["server"])
    addresses = server_env["PS_SHARD_ADDRESSES"].split(",")
    assert len(addresses) == len(shards)
    runs = [v for v in server["volumes"] if v.split(":")[1] == server_env["PS_OUT"]]
    assert runs == ["runs:/runs"]
    for address, (name, svc) in zip(addresses, shards.items(), strict=True):
        env = service_env(svc)
        host, port = env["PS_BIND"].rsplit(":", 1)
        assert address == f"{name}:{port}" and host == "0.0.0.0", name
        assert server["depends_on"][name]["condition"] == "service_healthy", name
        assert runs[0] in svc["volumes"], f"{name} must mount the run's volume at the server's {server_env['PS_OUT']}"
        with_token = compose_sharded({"PS_TOKEN": "a-token"})["services"]
        assert service_env(with_token[name])["PS_TOKEN"] == service_env(with_token["server"])["PS_TOKEN"] == "a-token"
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and app_file(test[1:]) == ROOT / "deploy" / "healthcheck.py", name
        assert test[test.index("--service") + 1] == "", f"{name}: ps-shard registers the health name '' only"
        assert svc.get("restart", "").startswith("on-failure"), name
    # workers and the evaluator are the default's: they learn the shards from the server
    for name in default["services"]:
        if name != "server":
            assert sharded["services"][name] == default["services"][name], name
    default_env = service_env(default["services"]["server"])
    assert {k: v for k, v in server_env.items() if k != "PS_SHARD_ADDRESSES"} == default_env
    # knobs reach the sharded server as the default's
    assert service_env(compose_sharded({"PS_WORKERS": "16"})["services"]["server"])["PS_WORKERS"] == "16"


def test_k8s_sharded_component_and_overlay_list_their_files():
    component = yaml.safe_load((K8S_SHARDED / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    listed = component.get("resources", []) + [patch["path"] for patch in component.get("patches", [])]
    assert sorted(listed) == sorted(p.name for p in K8S_SHARDED.glob("*.yaml") if p.name != "kustomization.yaml")
    overlay = yaml.safe_load((K8S_SHARDED_OVERLAY / "kustomization.yaml").read_text())
    assert overlay["kind"] == "Kustomization"
    assert [(K8S_SHARDED_OVERLAY / r).resolve() for r in overlay["resources"]] == [K8S]
    assert [(K8S_SHARDED_OVERLAY / c).resolve() for c in overlay["components"]] == [K8S_SHARDED]
    assert overlay["images"] == yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]


def test_k8s_sharded_overlay_renders_valid_manifests(tmp_path):
    """`kubectl apply -k deploy/k8s-sharded`: the default's objects plus the shards' StatefulSet and headless
    Service, and all of it (and the Component's own manifests) passes the Kubernetes schemas."""
    objects = kustomize(K8S_SHARDED_OVERLAY)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "ConfigMap")
    base = sorted((o["kind"], o["metadata"]["name"]) for o in kustomize(K8S) if o["kind"] != "ConfigMap")
    assert names == sorted(base + [("StatefulSet", "ps-shard"), ("Service", "ps-shards")])
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(objects))
    result = run_tool(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(out),
                      str(K8S_SHARDED / "shards.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(objects) + 2, result.stdout


def test_k8s_shards_and_server_agree():
    """The server Job is told every StatefulSet pod by its stable DNS name (pod.service), in order, at the port
    the pod binds and the headless Service names; it waits for all of them; every shard mounts ps-runs at the
    server's /runs, which every node may write; the probes ask the shard's port; the default has no shards."""
    image_uid = int(dict(v.split("=", 1) for k, v in dockerfile_instructions() if k == "ARG" and "=" in v)["APP_UID"])
    objects = kustomize(K8S_SHARDED_OVERLAY)
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    service = by[("Service", sts["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = sts["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for other in objects:  # the shards' selector picks no other pod, the server's Service no shard
        other_pod = other.get("spec", {}).get("template", {}).get("metadata", {}).get("labels")
        if other is not sts and other_pod:
            assert not service["spec"]["selector"].items() <= other_pod.items(), other["metadata"]["name"]
    assert not by[("Service", "ps-server")]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (shard,) = pod["spec"]["containers"]
    assert shard["command"] == [SHARD_SCRIPT]
    env = {e["name"]: e.get("value") for e in shard["env"]}
    host, port = env["PS_BIND"].rsplit(":", 1)
    assert host == "0.0.0.0" and shard["ports"][0]["containerPort"] == int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == shard["ports"][0]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert shard[probe]["grpc"] == {"port": int(port)}, probe  # service "": the name ps-shard registers
    addresses = [f"{sts['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
                 for i in range(sts["spec"]["replicas"])]
    server = by[("Job", "ps-server")]["spec"]["template"]["spec"]
    server_env = {e["name"]: e.get("value") for e in server["containers"][0]["env"]}
    assert server_env["PS_SHARD_ADDRESSES"].split(",") == addresses and len(addresses) >= 2
    (wait,) = [c for c in server["initContainers"] if c["name"] == "wait-for-shards"]
    argv = wait["command"]
    assert app_file(argv) == ROOT / "deploy" / "healthcheck.py"
    assert argv[argv.index("--service") + 1] == "" and [a for a in argv[2:] if ":" in a] == addresses
    # the run's volume: where the server writes, writable from every node
    runs = {m["name"]: m["mountPath"] for m in shard["volumeMounts"]}
    server_runs = {m["name"]: m["mountPath"] for m in server["containers"][0]["volumeMounts"]}
    assert runs["runs"] == server_runs["runs"] == server_env["PS_OUT"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims == {"runs": "ps-runs"}  # no data: the server sends each shard its slice and the run
    assert by[("PersistentVolumeClaim", "ps-runs")]["spec"]["accessModes"] == ["ReadWriteMany"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_uid
    # the unsharded default is untouched
    assert not [o for o in kustomize(K8S) if o["kind"] == "StatefulSet"]
    assert "PS_SHARD_ADDRESSES" not in k8s_env(job("ps-server"))
    assert all(not c["name"].startswith("wait-for-shards")
               for c in job("ps-server")["spec"]["template"]["spec"].get("initContainers", []))


# ----- the compose services as processes -----------------------------------------------------------
class Role(LoggedProcess):
    """One compose service's command, run as a local process with the service's environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        super().__init__(name, argv, env, log.parent, log)


def as_process(argv: list[str]) -> list[str]:
    """The argv that runs a container command here: console scripts via their entry point, /app via the repo."""
    script = app_file(argv)
    if script is not None:
        return [sys.executable, str(script), *argv[2:]]
    module, _, function = console_scripts()[argv[0]].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())",
            *argv[1:]]


@pytest.fixture
def roles() -> Iterator[list[Role]]:
    started: list[Role] = []
    yield started
    for role in started:
        if role.proc.poll() is None:
            role.proc.kill()
        role.proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["default", "sharded"])
def test_compose_services_train_to_the_end_as_processes(tmp_path, roles, sharded):
    """server, worker, slow-worker and evaluator exactly as compose starts them, on digits with K = 2; sharded:
    with the shard services of deploy/compose.sharded.yml, the server their coordinator."""
    knobs = {"PS_WORKERS": "2", "PS_DATASET": "digits", "PS_MODEL": "mlp", "PS_ITERATIONS": "300",
             "PS_LINGER": "15", "PS_EVAL_EVERY": "10",  # what a person would put on `docker compose up`
             "PS_TOKEN": "a-shared-deploy-test-token"}  # the health probe goes without: it is exempt
    services = (compose_sharded if sharded else compose)(knobs)["services"]
    volumes = {"/data": tmp_path / "data", "/runs": tmp_path / "runs"}
    for path in volumes.values():
        path.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX + "_")}
    base |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # the image's ENV; the package as installed

    def environment(name: str, **overrides: str) -> dict[str, str]:
        env = service_env(services[name]) | overrides
        # Metrics on port 9190 of each container; here the processes share one host: each a free port, on loopback.
        env |= {k: v for k, v in METRICS_HERE.items() if k in env}
        for container_path, local in volumes.items():  # the volumes, mounted here
            env = {k: v.replace(container_path, str(local), 1) if v.startswith(container_path) else v
                   for k, v in env.items()}
        return base | env

    def start(name: str, env: dict[str, str]) -> Role:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        role = Role(name, as_process(services[name]["command"]), env, workdir / "output.log")
        roles.append(role)
        return role

    # The shards (compose starts them first: the server waits until they are healthy), each on loopback here, on
    # a port of its choosing; the server is given their addresses as compose's are, by service name.
    shard_address = {}
    for name in shard_services({"services": services}):
        shard_env = environment(name, PS_BIND="127.0.0.1:0")
        shard = start(name, shard_env)
        port = int(shard.wait_for(r"ps-shard listening on (\S+):(\d+)", timeout=60).group(2))
        shard_env["PS_BIND"] = f"127.0.0.1:{port}"  # the probe reads the port of PS_BIND, as in the container
        probe = subprocess.run(as_process(services[name]["healthcheck"]["test"][1:]), env=shard_env,
                               capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 0, probe.stderr  # compose: shard healthy, the server may start
        shard_address[f"{name}:{services[name]['environment']['PS_BIND'].rsplit(':', 1)[1]}"] = f"127.0.0.1:{port}"
    overrides = {"PS_BIND": "127.0.0.1:0"}
    if sharded:
        given = service_env(services["server"])["PS_SHARD_ADDRESSES"].split(",")
        assert sorted(given) == sorted(shard_address)
        overrides["PS_SHARD_ADDRESSES"] = ",".join(shard_address[a] for a in given)

    # The server listens on 0.0.0.0:50051 in its container; here on loopback, on a port of its choosing.
    server_env = environment("server", **overrides)
    server = start("server", server_env)
    port = int(server.wait_for(LISTENING_PATTERN, timeout=60).group(2))
    metrics_port = int(server.wait_for(METRICS_PATTERN, timeout=10).group(3))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert "ormo_ps_server_workers_expected 2.0" in text and knobs["PS_TOKEN"] not in text
    server_env["PS_BIND"] = f"127.0.0.1:{port}"  # the probe reads the port of PS_BIND, as in the container
    health = as_process(services["server"]["healthcheck"]["test"][1:])
    probe = subprocess.run(health, env=server_env, capture_output=True, text=True, timeout=30, check=False)
    assert probe.returncode == 0, probe.stderr  # compose: server healthy, the others may start

    address = {"PS_SERVER": f"127.0.0.1:{port}"}
    workers = [start("worker", environment("worker", **address)),
               start("slow-worker", environment("slow-worker", **address))]
    evaluator = start("evaluator", environment("evaluator", **address))
    for role in [*workers, evaluator, server]:
        assert role.proc.wait(timeout=120) == 0, f"{role.name}:\n{role.output()[-3000:]}"
    for shard in roles[:len(shard_address)]:  # they exit with the run (PS_EXIT_AFTER_RUN), so `up` returns
        assert shard.proc.wait(timeout=60) == 0, f"{shard.name}:\n{shard.output()[-3000:]}"

    for role in workers:
        result = json.loads(role.output().strip().splitlines()[-1])
        assert result["stop_reason"] == "STOP_REASON_DONE" and result["gradients_sent"] > 0, role.name
    log = server.output()
    assert re.search(r"registered \(\S+, slowdown 4\.00\)", log) and re.search(r"slowdown 1\.00", log)
    records = [json.loads(line) for line in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["event"] for r in records]
    summary = records[kinds.index("summary")]
    assert summary["iterations"] == 300 and summary["workers"] == 2 and min(summary["gradients_per_worker"]) > 0
    final_eval = json.loads(evaluator.output().strip().splitlines()[-1])
    assert final_eval["iteration"] == 300 and final_eval["test_accuracy"] > 0.5
    assert "eval" in kinds  # the evaluator's records went to the server's metrics file, on the runs volume
    for name in ("checkpoint.pt", "final.pt"):
        assert (tmp_path / "runs" / name).is_file(), name
    if sharded:  # each shard wrote its slice where the server told it: on the runs volume, as the server sees it
        count = len(shard_address)
        assert sorted(p.name for p in (tmp_path / "runs" / "shards").iterdir()) == [
            f"shard-{i}-of-{count}.pt" for i in range(count)]
        assert f"attached {count} shards" in log
    # the run is over and the server gone: the probe says so
    gone = subprocess.run(health, env=server_env, capture_output=True, timeout=30, check=False)
    assert gone.returncode == 1


def test_the_run_settings_in_the_container_files_are_current():
    """docker-compose.yml's x-run-env block and deploy/k8s/run.env are written from RunConfig (make deploy-env)."""
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "environment.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run_env = compose()["x-run-env"]
    from ormo_ps.common.settings import env_names
    from ormo_ps.server.config import RunConfig

    assert list(run_env) == env_names(RunConfig)
    assert set(env_names(RunConfig)) <= set(service_env(compose()["services"]["server"]))
    assert set(env_names(RunConfig)) <= set(k8s_env(job("ps-server")))
