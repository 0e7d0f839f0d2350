#!/usr/bin/env bash
# Build the OrMo-PS image (deploy/Dockerfile) as ormo-ps:<version>, on a machine with or without a registry.
#
#   deploy/build-image.sh            # what `make image` runs
#
# With a reachable registry this is the plain `docker build` of the README (python:3.11-slim, CPU-only
# torch). Where python:3.11-slim cannot be pulled it builds the stand-in base first (deploy/local-base.sh:
# Debian bookworm + Python 3.11, needs root) and uses it; where PyTorch's CPU-only index cannot be reached,
# torch comes from PyPI (a CUDA build: a bigger image, and about 140 MB more memory per process).
# Override with BASE_IMAGE=..., TORCH_INDEX_URL=..., IMAGE=...; extra arguments go to `docker build`.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version *= *//p' setup.cfg)
IMAGE=${IMAGE:-ormo-ps:$VERSION}
CPU_INDEX=https://download.pytorch.org/whl/cpu
say() { echo "build-image: $*" >&2; }

if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim
  else
    say "python:3.11-slim cannot be pulled: building the stand-in base (deploy/local-base.sh)"
    deploy/local-base.sh
    BASE_IMAGE=ormo-ps-base:bookworm
  fi
fi
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  if python3 -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=15)" 2>/dev/null; then
    TORCH_INDEX_URL=$CPU_INDEX
  else
    say "PyTorch's CPU-only index cannot be reached: torch from PyPI (a CUDA build)"
    TORCH_INDEX_URL=https://pypi.org/simple
  fi
fi
say "docker build -t $IMAGE (base $BASE_IMAGE, torch from $TORCH_INDEX_URL)"
start=$(date +%s)
docker build -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
  -t "$IMAGE" "$@" .
say "built $IMAGE in $(( $(date +%s) - start ))s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
