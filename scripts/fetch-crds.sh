#!/usr/bin/env bash
# Fetches third-party CRDs the chart's optional objects need, for tests against the kwok cluster:
# prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1), taken from the operator's Go
# module source zip on the Go module proxy (example/prometheus-operator-crd/), verified by go.sum's
# checksum database like any module. Cached outside the clone (LORAPLANE_CACHE, default
# ~/.cache/loraplane); nothing large is committed. Prints the CRD file's path on stdout.
set -euo pipefail

PROMETHEUS_OPERATOR_VERSION="v0.85.0"
MODULE="github.com/prometheus-operator/prometheus-operator"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
OUT="$CACHE/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
CRD="monitoring.coreos.com_servicemonitors.yaml"

if [ -s "$OUT/$CRD" ]; then
  echo "$OUT/$CRD"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "[fetch-crds] Go is required to fetch $MODULE" >&2; exit 1; }
export GOMODCACHE="$CACHE/go/mod" GOFLAGS=-mod=mod
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Outside any module: `go mod download` of an explicit version needs no go.mod.
dir="$(cd "$work" && go mod download -json "$MODULE@$PROMETHEUS_OPERATOR_VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[ -s "$dir/example/prometheus-operator-crd/$CRD" ] || {
  echo "[fetch-crds] $MODULE@$PROMETHEUS_OPERATOR_VERSION has no example/prometheus-operator-crd/$CRD" >&2
  exit 1
}
mkdir -p "$OUT"
cp "$dir/example/prometheus-operator-crd/$CRD" "$OUT/$CRD.tmp"
chmod u+w "$OUT/$CRD.tmp"
mv "$OUT/$CRD.tmp" "$OUT/$CRD"
echo "$OUT/$CRD"
