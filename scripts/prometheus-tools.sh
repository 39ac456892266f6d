#!/usr/bin/env bash
# Builds Prometheus and promtool for the monitoring tests (tests/test_monitoring*.py) from the Go
# module proxy, into the cache directory outside the clone (LORAPLANE_CACHE, default
# ~/.cache/loraplane), once per machine and version. Idempotent: when both binaries are there it
# builds nothing and returns at once. Prints the bin directory on stdout; logs go to stderr.
#
# Pin: Prometheus 3.x is tagged v0.3XX.Y in Go (the module's v3 tags are not Go-semver); v0.316.0 is
# Prometheus 3.16.0. `go install pkg@version` resolves Prometheus' own go.mod exactly as released,
# checked by the checksum database. Built without the `builtinassets` tag: the web UI is not in the
# binary (the tests use the HTTP API only).
set -euo pipefail

CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
PROMETHEUS_VERSION="v0.316.0"   # the Go module's tag of Prometheus 3.16.0
RELEASE="3.$(( 10#$(cut -d. -f2 <<<"$PROMETHEUS_VERSION") - 300 )).$(cut -d. -f3 <<<"$PROMETHEUS_VERSION")"
DIR="$CACHE/tools/prometheus-$PROMETHEUS_VERSION"
BINS=(prometheus promtool)

log() { printf '[prometheus-tools] %s\n' "$*" >&2; }

# --- fast path: built already (no Go invoked) -----------------------------------------------------
complete() { local b; for b in "${BINS[@]}"; do [ -x "$1/$b" ] || return 1; done; }
if complete "$DIR"; then
  echo "$DIR"
  exit 0
fi

command -v go >/dev/null 2>&1 || { log "Go >= 1.26 is required to build Prometheus"; exit 1; }
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false"
TMP="$DIR.tmp"
mkdir -p "$TMP"   # kept across an interrupted run: a binary already in it is not built again

# Version stamps as Prometheus' release build (promu) sets them, so `prometheus --version` tells
# the truth; the build date is the release's publication time from the module proxy.
DATE="$(go list -m -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" 2>/dev/null \
  | awk -F'"' '$2 == "Time" { print $4 }' || true)"
V="github.com/prometheus/common/version"
LDFLAGS="-s -w -X $V.Version=$RELEASE -X $V.Revision=$PROMETHEUS_VERSION -X $V.Branch=HEAD"
LDFLAGS+=" -X $V.BuildUser=loraplane"
LDFLAGS+=" -X $V.BuildDate=${DATE:-unknown}"

log "building Prometheus $RELEASE ($PROMETHEUS_VERSION) into $DIR (once per machine)"
for name in "${BINS[@]}"; do
  [ -x "$TMP/$name" ] && continue
  start=$SECONDS
  log "building $name"
  GOBIN="$TMP/gobin" nice -n 10 go install -ldflags "$LDFLAGS" \
    "github.com/prometheus/prometheus/cmd/$name@$PROMETHEUS_VERSION"
  mv "$TMP/gobin/$name" "$TMP/$name"
  log "built $name in $((SECONDS - start)) s"
done
rmdir "$TMP/gobin" 2>/dev/null || true
rm -rf "$DIR"
mv "$TMP" "$DIR"
"$DIR/prometheus" --version >&2
echo "$DIR"
