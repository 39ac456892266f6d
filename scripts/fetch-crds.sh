#!/usr/bin/env bash
# Fetches third-party CRDs the chart's optional objects need, for tests against the kwok cluster:
# - prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs (monitoring.coreos.com/v1),
#   from the operator's Go module source zip (example/prometheus-operator-crd/);
# - the Gateway API's HTTPRoute CRD (gateway.networking.k8s.io/v1, standard channel), from the
#   sigs.k8s.io/gateway-api module source zip (config/crd/standard/).
# Both come from the Go module proxy, verified by go.sum's checksum database like any module. Cached
# outside the clone (LORAPLANE_CACHE, default ~/.cache/loraplane); nothing large is committed.
# Prints each CRD file's path on stdout, one per line.
#   scripts/fetch-crds.sh        the CRDs above
#   scripts/fetch-crds.sh argo   Argo Workflows' Workflow CRD and its published JSON schema
#                                (api/jsonschema/schema.json), for `loraplane pipeline export --format argo`
set -euo pipefail

PROMETHEUS_OPERATOR_VERSION="v0.85.0"
GATEWAY_API_VERSION="v1.4.1"
ARGO_WORKFLOWS_VERSION="v4.0.5"   # only its CRD and schema files are used: no Argo code is built or run
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# fetch MODULE VERSION DIR_IN_MODULE FILE OUT_NAME: copies DIR_IN_MODULE/FILE of the module into
# $CACHE/crds/OUT_NAME-VERSION/ (once) and prints its path.
fetch() {
  local module="$1" version="$2" dir_in="$3" file="$4" out="$CACHE/crds/$5-$2"
  if [ -s "$out/$file" ]; then
    echo "$out/$file"
    return 0
  fi
  command -v go >/dev/null 2>&1 || { echo "[fetch-crds] Go is required to fetch $module" >&2; exit 1; }
  local dir
  # Outside any module: `go mod download` of an explicit version needs no go.mod.
  dir="$(cd "$work" && GOMODCACHE="$CACHE/go/mod" GOFLAGS=-mod=mod go mod download -json "$module@$version" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -s "$dir/$dir_in/$file" ] || {
    echo "[fetch-crds] $module@$version has no $dir_in/$file" >&2
    exit 1
  }
  mkdir -p "$out"
  cp "$dir/$dir_in/$file" "$out/$file.tmp"
  chmod u+w "$out/$file.tmp"
  mv "$out/$file.tmp" "$out/$file"
  echo "$out/$file"
}

if [ "${1:-}" = argo ]; then
  fetch github.com/argoproj/argo-workflows/v4 "$ARGO_WORKFLOWS_VERSION" \
    manifests/base/crds/full argoproj.io_workflows.yaml argo-workflows
  fetch github.com/argoproj/argo-workflows/v4 "$ARGO_WORKFLOWS_VERSION" \
    api/jsonschema schema.json argo-workflows
  exit 0
fi
for kind in servicemonitors podmonitors prometheusrules; do
  fetch github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" \
    example/prometheus-operator-crd "monitoring.coreos.com_$kind.yaml" prometheus-operator
done
fetch sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION" \
  config/crd/standard gateway.networking.k8s.io_httproutes.yaml gateway-api
