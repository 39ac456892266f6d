#!/usr/bin/env bash
# Builds the binaries of a container-free Kubernetes control plane for tests (kwok's "binary"
# runtime): kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok and kwokctl,
# all from the Go module proxy, into the cache directory outside the clone (LORAPLANE_CACHE, default
# ~/.cache/loraplane), once per machine and version set. Idempotent: when the binaries are there it
# builds nothing and returns at once. Prints the bin directory on stdout; logs go to stderr.
#
# Pins: k8s.io/kubernetes in tools/k8s/go.mod (+ go.sum), etcd in tools/k8s/etcd/go.mod (+ go.sum),
# kwok below (go install'ed at its tag, with its own go.sum, checked by the checksum database).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
MOD="$ROOT/tools/k8s"
KWOK_VERSION="v0.8.0"   # supports Kubernetes up to 1.36 (its supported_releases.txt)

log() { printf '[k8s-tools] %s\n' "$*" >&2; }

# The versions come from the go.mod files, so the cache key can never disagree with what is built.
modver() { awk -v m="$2" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m { print $2; exit }' "$1"; }
K8S_VERSION="$(modver "$MOD/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(modver "$MOD/etcd/go.mod" go.etcd.io/etcd/server/v3)"
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || { log "cannot read the pinned versions from $MOD"; exit 1; }

DIR="$CACHE/tools/k8s-$K8S_VERSION-kwok-$KWOK_VERSION-etcd-$ETCD_VERSION"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok kwokctl)

# --- fast path: everything built already (no Go invoked) -------------------------------------------
complete() { local b; for b in "${BINS[@]}"; do [ -x "$1/$b" ] || return 1; done; }
if complete "$DIR"; then
  echo "$DIR"
  exit 0
fi

# --- build (once per machine), into $DIR.tmp, then renamed --------------------------------------------
command -v go >/dev/null 2>&1 || { log "Go >= 1.26 is required to build the Kubernetes tools"; exit 1; }
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
# Static binaries like the upstream release builds; the local Go only (k8s 1.36 needs go >= 1.26.0).
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false"
TMP="$DIR.tmp"
mkdir -p "$TMP"   # kept across an interrupted run: binaries already in it are not built again

# Version stamps, as Kubernetes' hack/lib/version.sh sets them, so that `kube-apiserver --version`
# and `kubectl version --client` tell the truth (kwokctl reads them to choose component flags).
# The build date is the release's publication time from the module proxy, which keeps it reproducible.
k8s_ldflags() {
  local date pkg flags="-s -w" major minor
  IFS=. read -r major minor _ <<<"${K8S_VERSION#v}"
  date="$(cd "$MOD" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$date"
  done
  echo "$flags"
}

# build NAME HOW: unless NAME is built already, runs `HOW NAME OUT` (which writes the binary to OUT),
# then renames OUT to $TMP/NAME, so that an interrupted build never leaves a half-written binary.
build() {
  local name="$1" how="$2" start=$SECONDS
  [ -x "$TMP/$name" ] && return 0
  log "building $name"
  rm -f "$TMP/$name.part"
  "$how" "$name" "$TMP/$name.part"
  mv "$TMP/$name.part" "$TMP/$name"
  log "built $name in $((SECONDS - start)) s"
}
k8s_cmd() { (cd "$MOD" && go build -o "$2" -ldflags "$K8S_LDFLAGS" "k8s.io/kubernetes/cmd/$1"); }
etcd_cmd() { (cd "$MOD/etcd" && go build -o "$2" -ldflags "-s -w" .); }
# kwok: `go install pkg@version` resolves kwok's own go.mod exactly as released. The KubeVersion
# stamp is what kwok's release build sets (its default Kubernetes version); ours is the one built.
kwok_cmd() {
  GOBIN="$TMP/gobin" go install -ldflags "$KWOK_LDFLAGS" "sigs.k8s.io/kwok/cmd/$1@$KWOK_VERSION"
  mv "$TMP/gobin/$1" "$2"
}

log "building Kubernetes $K8S_VERSION, etcd $ETCD_VERSION and kwok $KWOK_VERSION into $DIR (once per machine)"
K8S_LDFLAGS="$(k8s_ldflags)"
KWOK_LDFLAGS="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$K8S_VERSION"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do build "$cmd" k8s_cmd; done
build etcd etcd_cmd
for cmd in kwok kwokctl; do build "$cmd" kwok_cmd; done
rm -rf "$TMP/gobin"

complete "$TMP" || { log "some binaries are missing from $TMP"; exit 1; }
rm -rf "$DIR" && mv "$TMP" "$DIR"
log "built: $("$DIR/kube-apiserver" --version), $("$DIR/etcd" --version | head -1), $("$DIR/kwok" --version)"
echo "$DIR"
