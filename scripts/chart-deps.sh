#!/usr/bin/env bash
# The chart's one downloaded dependency: NVIDIA's gpu-operator chart (charts/loraplane/Chart.yaml,
# rendered only with gpu.mode=operator and gpu-operator.enabled=true). Helm refuses to render a chart
# whose declared dependency is missing from charts/, even a disabled one, so a checkout needs it there
# before `helm template|install|lint` work. Idempotent: returns at once when the archive is present.
#
# Two sources, in this order:
#   repo    `helm dependency build`: the pinned release from NVIDIA's repository (Chart.yaml's version).
#           Needs the repository added (`helm repo add nvidia https://helm.ngc.nvidia.com/nvidia`) and
#           network access to it; what a user with internet access does (README, "GPU modes").
#   source  NVIDIA's chart from its own source tree (deployments/gpu-operator in github.com/NVIDIA/
#           gpu-operator) at a pinned commit, through the Go module proxy (checked by Go's checksum
#           database), packaged with `helm package`. For machines that reach the Go proxy but not
#           helm.ngc.nvidia.com (this project's CI). Its chart version reads v1.0.0-devel: the release
#           pipeline stamps the version; the commit is the one NVIDIA's v25.10 line was cut from (same
#           driver 580.82.07, device plugin v0.17.4 and DCGM exporter 4.3.1 pins).
# LORAPLANE_CHART_DEPS=repo|source forces one; default: repo when the repository is added, else source.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
CHART="$ROOT/charts/loraplane"
HELM="${LORAPLANE_HELM:-$ROOT/.venv/bin/helm}"
REPO_URL="https://helm.ngc.nvidia.com/nvidia"
SOURCE_MODULE="github.com/NVIDIA/gpu-operator"
SOURCE_VERSION="v0.0.0-20250917190837-d73a0086a6ba"

log() { printf '[chart-deps] %s\n' "$*" >&2; }

if compgen -G "$CHART/charts/gpu-operator-*.tgz" >/dev/null; then
  exit 0
fi

mode="${LORAPLANE_CHART_DEPS:-auto}"
if [ "$mode" = auto ]; then
  if "$HELM" repo list -o json 2>/dev/null | grep -q "\"$REPO_URL\""; then mode=repo; else mode=source; fi
fi

case "$mode" in
  repo)
    log "helm dependency build (gpu-operator from $REPO_URL)"
    "$HELM" dependency build "$CHART" >&2
    ;;
  source)
    command -v go >/dev/null 2>&1 || { log "Go is required to fetch $SOURCE_MODULE from the Go module proxy"; exit 1; }
    log "gpu-operator chart from NVIDIA's source ($SOURCE_MODULE@$SOURCE_VERSION, Go module proxy)"
    dir="$(GOMODCACHE="$CACHE/go/mod" GOFLAGS=-modcacherw go mod download -json "$SOURCE_MODULE@$SOURCE_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$dir/deployments/gpu-operator" ] || { log "no deployments/gpu-operator in $dir"; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$HELM" package "$dir/deployments/gpu-operator" -d "$tmp" >/dev/null
    mv "$tmp"/gpu-operator-*.tgz "$CHART/charts/"
    ;;
  *)
    log "LORAPLANE_CHART_DEPS=$mode: use repo or source"
    exit 2
    ;;
esac
log "$(cd "$CHART/charts" && ls gpu-operator-*.tgz)"
