#!/usr/bin/env bash
# The product's CUDA images (and the slim gateway's production build) from docker/*.Dockerfile, with
# docker (a daemon that answers) or buildah, tagged from the one version (__version__ in __init__.py):
#   $IMAGE_REPO/loraplane:<version>           docker/serving.Dockerfile, on vLLM's official image
#   $IMAGE_REPO/loraplane-trainer:<version>   docker/trainer.Dockerfile, on PyTorch's CUDA runtime image
#   $IMAGE_REPO/loraplane-gateway:<version>   docker/gateway.Dockerfile, python slim
# IMAGE_REPO defaults to ghcr.io/loraplane (the chart's default repositories). The base images come
# from their registries, so this needs a machine that reaches them. The CPU images the tests run are
# built without a registry by scripts/build-images.sh; `make images` runs both.
#
#   scripts/build-cuda-images.sh build   build all three; prints their references, one a line. With no
#                                        builder it prints nothing and says so on stderr (exit 0), or
#                                        fails when LORAPLANE_REQUIRE_BUILDER=1 (a real release)
#   scripts/build-cuda-images.sh tool    print the builder it would use (docker or buildah)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/loraplane}"
VERSION="$(awk -F'"' '/^__version__ *=/ {print $2; exit}' "$ROOT/__init__.py")"
log() { printf '[cuda-images] %s\n' "$*" >&2; }

builder() {
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker
  elif command -v buildah >/dev/null 2>&1; then echo buildah
  fi
}

case "${1:-build}" in
  tool)
    tool="$(builder)"
    [ -n "$tool" ] || { log "no builder: neither a docker daemon nor buildah"; exit 1; }
    echo "$tool"
    ;;
  build)
    tool="$(builder)"
    if [ -z "$tool" ]; then
      if [ "${LORAPLANE_REQUIRE_BUILDER:-0}" = 1 ]; then
        log "no builder: neither a docker daemon nor buildah (install one, or start the daemon)"
        exit 1
      fi
      log "skipped: neither a docker daemon nor buildah here (the CPU images: scripts/build-images.sh)"
      exit 0
    fi
    for spec in serving:loraplane trainer:loraplane-trainer gateway:loraplane-gateway; do
      file="docker/${spec%%:*}.Dockerfile"
      ref="$IMAGE_REPO/${spec#*:}:$VERSION"
      log "$tool: $file -> $ref"
      case "$tool" in
        docker) docker build -f "$ROOT/$file" --build-arg "LORAPLANE_VERSION=$VERSION" -t "$ref" "$ROOT" >&2 ;;
        buildah) buildah bud -f "$ROOT/$file" --build-arg "LORAPLANE_VERSION=$VERSION" -t "$ref" "$ROOT" >&2 ;;
      esac
      echo "$ref"
    done
    ;;
  *) echo "usage: scripts/build-cuda-images.sh [build|tool]" >&2; exit 2 ;;
esac
