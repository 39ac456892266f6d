#!/usr/bin/env bash
# Cut a release of loraplane: the wheel and sdist, the Helm chart as an OCI artefact, the images.
# The version has one source, `__version__` in __init__.py (pyproject reads it; the chart's
# appVersion and every image tag are stamped from it here).
#
#   scripts/release.sh --dry-run   every step on this machine short of pushing: what would be pushed is
#                                  printed ("would run: ..."); artefacts land in dist/ (or --out DIR)
#   scripts/release.sh             the same, then pushes (CI on a tag: .github/workflows/release.yml)
#
# Steps: 1 version checks (Chart.yaml's appVersion, the tag in CI) · 2 the chart's dependency
# (scripts/chart-deps.sh) · 3 wheel + sdist (uv build) · 4 the wheel alone in a fresh virtualenv, no
# extras: `loraplane --version` and `install --dry-run` of the packaged chart, torch absent · 5 the chart:
# helm lint --strict, helm package with appVersion = the version · 6 images: `make images` (the CPU
# images from Debian packages, as root; the CUDA images with docker or buildah where one runs) ·
# 7 push: the chart (helm push oci://$CHART_REPO), the images ($IMAGE_REPO), the wheel (uv publish).
#
# Environment: IMAGE_REPO (default ghcr.io/loraplane), CHART_REPO (default oci://ghcr.io/loraplane/charts),
# UV_PUBLISH_TOKEN or trusted publishing for PyPI, RELEASE_TAG (CI: the pushed tag, must be v<version>).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/loraplane}"
CHART_REPO="${CHART_REPO:-oci://ghcr.io/loraplane/charts}"
HELM="${LORAPLANE_HELM:-$ROOT/.venv/bin/helm}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$CACHE/uv}"

dry_run=0
out="$ROOT/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: scripts/release.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[release] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
push() {
  if [ "$dry_run" -eq 1 ]; then
    printf 'would run: %s\n' "$*"
  else
    log "running: $*"
    "$@"
  fi
}
uv_bin() {
  local found
  found="$(ls -d "$CACHE"/tools/uv-*/bin/uv 2>/dev/null | sort -V | tail -1)"
  [ -n "$found" ] || found="$(command -v uv || true)"
  [ -n "$found" ] || die "uv is needed (make setup installs it into $CACHE/tools)"
  echo "$found"
}

# --- 1. the version, and everything that must agree with it -------------------------------------------
VERSION="$(awk -F'"' '/^__version__ *=/ {print $2; exit}' "$ROOT/__init__.py")"
[ -n "$VERSION" ] || die "no __version__ in __init__.py"
app_version="$(awk -F'"' '/^appVersion:/ {print $2; exit}' "$ROOT/charts/loraplane/Chart.yaml")"
[ "$app_version" = "$VERSION" ] \
  || die "charts/loraplane/Chart.yaml appVersion is $app_version, the version is $VERSION: make them agree"
chart_version="$(awk '/^version:/ {print $2; exit}' "$ROOT/charts/loraplane/Chart.yaml")"
if [ -n "${RELEASE_TAG:-}" ] && [ "$RELEASE_TAG" != "v$VERSION" ]; then
  die "the tag $RELEASE_TAG is not v$VERSION (__version__ in __init__.py)"
fi
log "loraplane $VERSION (chart $chart_version)$([ "$dry_run" -eq 1 ] && echo ', dry run: nothing is pushed')"
mkdir -p "$out"
rm -f "$out"/loraplane-*

# --- 2. the chart's downloaded dependency --------------------------------------------------------------
LORAPLANE_HELM="$HELM" bash "$ROOT/scripts/chart-deps.sh"

# --- 3. wheel and sdist, built from a clean copy of the tracked tree (no stray build/ in the clone) ------
UV="$(uv_bin)"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - 2>/dev/null) \
  | tar -xf - -C "$src"
cp "$ROOT"/charts/loraplane/charts/gpu-operator-*.tgz "$src/charts/loraplane/charts/"
"$UV" build --quiet --out-dir "$out" "$src" >&2
wheel="$(ls "$out"/loraplane-"$VERSION"-py3-none-any.whl)"
log "built $(basename "$wheel") and $(cd "$out" && ls loraplane-"$VERSION".tar.gz)"

# --- 4. the wheel alone: the control layer without torch, and its packaged chart ----------------------
venv="$src/.wheel-venv"
"$UV" venv --quiet --python "$ROOT/.venv/bin/python" "$venv" >&2
# the lock's versions, from uv's cache when they are there (make setup filled it), else from PyPI
"$UV" pip install --quiet --python "$venv/bin/python" -c "$ROOT/requirements/lock.txt" "$wheel" >&2
[ "$("$venv/bin/loraplane" --version)" = "loraplane $VERSION" ] || die "the wheel's CLI is not $VERSION"
! "$venv/bin/python" -c 'import torch' 2>/dev/null || die "the base wheel pulled in torch"
(cd "$src" && LORAPLANE_HELM="$HELM" KUBECONFIG=/nonexistent "$venv/bin/loraplane" -n release-check \
  install --dry-run >"$src/rendered.yaml") || die "the wheel's packaged chart does not render"
grep -q "^kind: Deployment" "$src/rendered.yaml" || die "the packaged chart rendered no Deployment"
log "the wheel installs without torch and renders its packaged chart"

# --- 5. the chart ------------------------------------------------------------------------------------------
"$HELM" lint --strict "$ROOT/charts/loraplane" --kube-version 1.31.0 >/dev/null \
  || die "helm lint --strict failed: run it for the details"
"$HELM" package "$ROOT/charts/loraplane" --app-version "$VERSION" -d "$out" >/dev/null
chart_tgz="$out/loraplane-$chart_version.tgz"
[ -f "$chart_tgz" ] || die "helm package wrote no $chart_tgz"
log "packaged $(basename "$chart_tgz") (appVersion $VERSION)"

# --- 6. images -----------------------------------------------------------------------------------------------
images=()
if [ "$(id -u)" -eq 0 ] && command -v mmdebstrap >/dev/null && command -v umoci >/dev/null; then
  while read -r layout; do images+=("$layout"); done < <(bash "$ROOT/scripts/build-images.sh" build)
  log "CPU images: ${images[*]}"
else
  log "CPU images skipped: they need root, mmdebstrap and umoci (make images)"
fi
require=$((1 - dry_run))
cuda_refs="$(IMAGE_REPO="$IMAGE_REPO" LORAPLANE_REQUIRE_BUILDER="$require" bash "$ROOT/scripts/build-cuda-images.sh" build)" \
  || die "the CUDA images failed"
[ -n "$cuda_refs" ] && log "CUDA images: $(echo "$cuda_refs" | tr '\n' ' ')"

# --- 7. push -----------------------------------------------------------------------------------------------
push "$HELM" push "$chart_tgz" "$CHART_REPO"
if [ -n "$cuda_refs" ]; then
  tool="$(bash "$ROOT/scripts/build-cuda-images.sh" tool)"
  while read -r ref; do push "$tool" push "$ref"; done <<<"$cuda_refs"
else  # a dry run without a builder: what a release machine would push
  for name in loraplane loraplane-trainer loraplane-gateway; do push docker push "$IMAGE_REPO/$name:$VERSION"; done
fi
push "$UV" publish "$wheel" "$out/loraplane-$VERSION.tar.gz"

(cd "$out" && sha256sum loraplane-*) | sed 's/^/sha256 /'
