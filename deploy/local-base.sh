#!/usr/bin/env bash
# A stand-in for python:3.11-slim on machines that reach no image registry (only Debian's mirror and PyPI):
# Debian bookworm (minbase) + Python 3.11 in a virtual environment at /opt/venv, first on PATH, so that
# `python` and `pip` are Python 3.11 as deploy/Dockerfile expects. Use it through the Dockerfile's argument:
#
#   sudo deploy/local-base.sh                       # builds the image ormo-ps-base:bookworm (about 1 minute)
#   docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=ormo-ps-base:bookworm \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t ormo-ps:0.1.0 .
#
# Options (environment): IMAGE (the tag to build), MIRROR (default: the first Debian URI apt uses here,
# else http://deb.debian.org/debian), CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt): the host's CA
# bundle, copied into the image at /etc/ormo-ps/pip-ca.crt with PIP_CERT pointing at it, for hosts whose
# package registries are reached through a proxy with its own CA. It sits at a path of its own because
# Debian's ca-certificates package rewrites the standard one whenever it is installed or updated.
# Needs root (debootstrap), debootstrap and a running Docker engine. Idempotent: an existing IMAGE is
# kept unless REBUILD=1.
set -euo pipefail

IMAGE=${IMAGE:-ormo-ps-base:bookworm}
SUITE=bookworm
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

die() { echo "local-base: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap builds a root file system)"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install -y debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first)"
[ -r "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE is not readable (set CA_BUNDLE)"

if [ "${REBUILD:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "local-base: $IMAGE exists (REBUILD=1 to build it again)"
  exit 0
fi

if [ -z "${MIRROR:-}" ]; then
  # The mirror apt uses on this host: deb822 sources first, then the classic list.
  MIRROR=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
  [ -n "$MIRROR" ] || MIRROR=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

root=$(mktemp -d /tmp/ormo-ps-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "local-base: debootstrap $SUITE from $MIRROR into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" >/dev/null

echo "local-base: Python virtual environment at /opt/venv"
chroot "$root" /usr/bin/python3 -m venv /opt/venv
chroot "$root" /opt/venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
install -D -m 0644 "$CA_BUNDLE" "$root/etc/ormo-ps/pip-ca.crt"
# Smaller image: no apt lists, documentation or caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*

echo "local-base: docker import as $IMAGE"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ormo-ps/pip-ca.crt' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "OrMo-PS local base: Debian $SUITE minbase + Python 3.11 venv (deploy/local-base.sh)" \
  - "$IMAGE" >/dev/null
docker run --rm "$IMAGE" python -c 'import sys, ssl; print("local-base:", sys.version.split()[0], ssl.OPENSSL_VERSION)'
docker image ls "$IMAGE"
