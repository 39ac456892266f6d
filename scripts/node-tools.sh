#!/usr/bin/env bash
# Everything a real single-node Kubernetes test cluster needs next to the control plane that
# scripts/k8s-tools.sh builds (scripts/real-node.sh runs it):
#   - Debian packages, installed with apt-get when missing (skipped when present): containerd (the CRI
#     runtime), runc, the CNI plugins (containernetworking-plugins), iptables, conntrack, ipset
#     (kube-router's NetworkPolicy sets), umoci (OCI image packing), busybox-static (the test image's
#     userland), openssl (the node's PKI);
#   - kubelet and kube-proxy at the pinned k8s.io/kubernetes (tools/k8s/go.mod, the control plane's
#     module, so most packages come from the Go build cache the control plane filled), a minimal
#     CoreDNS (tools/node/coredns) and kube-router for NetworkPolicy (tools/node/kube-router), each
#     pinned with its go.sum, from the Go module proxy, into
#     $LORAPLANE_CACHE/tools/node-k8s-<version>-coredns-<version>-kube-router-<version>, once per machine;
#   - two OCI images made without a registry (scripts/node-images.sh): the pod sandbox
#     localhost/loraplane/pause:local (tools/node/pause, a static Go binary) and the test image
#     localhost/loraplane/busybox:local (Debian's busybox-static), into
#     $LORAPLANE_CACHE/tools/node-images-<hash of their inputs>.
# Idempotent: when everything is there it builds nothing and returns at once. Prints the binaries
# directory and the images directory on stdout, one per line; logs go to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
K8S_MOD="$ROOT/tools/k8s"
DNS_MOD="$ROOT/tools/node/coredns"
NETPOL_MOD="$ROOT/tools/node/kube-router"
APT_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack ipset umoci busybox-static openssl)

log() { printf '[node-tools] %s\n' "$*" >&2; }

modver() { awk -v m="$2" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m { print $2; exit }' "$1"; }
K8S_VERSION="$(modver "$K8S_MOD/go.mod" k8s.io/kubernetes)"
COREDNS_VERSION="$(modver "$DNS_MOD/go.mod" github.com/coredns/coredns)"
KUBE_ROUTER_VERSION="$(modver "$NETPOL_MOD/go.mod" github.com/cloudnativelabs/kube-router/v2)"
[ -n "$K8S_VERSION" ] && [ -n "$COREDNS_VERSION" ] && [ -n "$KUBE_ROUTER_VERSION" ] \
  || { log "cannot read the pinned versions"; exit 1; }

# --- Debian packages -------------------------------------------------------------------------------
installed() { [ "$(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
missing=()
for p in "${APT_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi

# --- kubelet, kube-proxy, CoreDNS, kube-router ------------------------------------------------------
BIN_DIR="$CACHE/tools/node-k8s-$K8S_VERSION-coredns-$COREDNS_VERSION-kube-router-$KUBE_ROUTER_VERSION"
BINS=(kubelet kube-proxy coredns kube-router)
IMAGES_KEY="$(cat "$ROOT/tools/node/pause/main.go" "$ROOT/tools/node/pause/go.mod" "$ROOT/scripts/node-images.sh" \
  <(dpkg-query -W -f '${Version}' busybox-static) <(go version 2>/dev/null || true) | sha256sum | cut -c1-12)"
IMAGES_DIR="$CACHE/tools/node-images-$IMAGES_KEY"

complete() { local b; for b in "${BINS[@]}"; do [ -x "$1/$b" ] || return 1; done; }
if complete "$BIN_DIR" && [ -f "$IMAGES_DIR/pause.tar" ] && [ -f "$IMAGES_DIR/busybox.tar" ]; then
  echo "$BIN_DIR"
  echo "$IMAGES_DIR"
  exit 0
fi

command -v go >/dev/null 2>&1 || { log "Go >= 1.26 is required to build the node tools"; exit 1; }
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
# The same environment and flags as scripts/k8s-tools.sh, so that the packages kubelet shares with the
# control plane are Go build cache hits.
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false"

if ! complete "$BIN_DIR"; then
  TMP="$BIN_DIR.tmp"
  mkdir -p "$TMP"   # kept across an interrupted run: binaries already in it are not built again
  k8s_ldflags() {
    local date pkg flags="-s -w" major minor
    IFS=. read -r major minor _ <<<"${K8S_VERSION#v}"
    date="$(cd "$K8S_MOD" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      flags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$date"
    done
    echo "$flags"
  }
  build() {   # NAME HOW: `HOW NAME OUT` writes the binary to OUT, renamed to $TMP/NAME when complete
    local name="$1" how="$2" start=$SECONDS
    [ -x "$TMP/$name" ] && return 0
    log "building $name"
    rm -f "$TMP/$name.part"
    "$how" "$name" "$TMP/$name.part"
    mv "$TMP/$name.part" "$TMP/$name"
    log "built $name in $((SECONDS - start)) s"
  }
  k8s_cmd() { (cd "$K8S_MOD" && go build -o "$2" -ldflags "$K8S_LDFLAGS" "k8s.io/kubernetes/cmd/$1"); }
  coredns_cmd() { (cd "$DNS_MOD" && go build -o "$2" -ldflags "-s -w" .); }
  kube_router_cmd() {
    local pkg=github.com/cloudnativelabs/kube-router/v2
    (cd "$NETPOL_MOD" && go build -o "$2" -ldflags "-s -w -X $pkg/pkg/version.Version=$KUBE_ROUTER_VERSION" "$pkg/cmd/kube-router")
  }

  log "building kubelet + kube-proxy $K8S_VERSION, CoreDNS $COREDNS_VERSION and kube-router $KUBE_ROUTER_VERSION into $BIN_DIR (once per machine)"
  K8S_LDFLAGS="$(k8s_ldflags)"
  build coredns coredns_cmd
  build kube-router kube_router_cmd
  for cmd in kubelet kube-proxy; do build "$cmd" k8s_cmd; done
  complete "$TMP" || { log "some binaries are missing from $TMP"; exit 1; }
  rm -rf "$BIN_DIR" && mv "$TMP" "$BIN_DIR"
  log "built: $("$BIN_DIR/kubelet" --version), $("$BIN_DIR/coredns" -version | head -1)"
fi

if [ ! -f "$IMAGES_DIR/pause.tar" ] || [ ! -f "$IMAGES_DIR/busybox.tar" ]; then
  start=$SECONDS
  rm -rf "$IMAGES_DIR.tmp"
  bash "$ROOT/scripts/node-images.sh" "$IMAGES_DIR.tmp"
  rm -rf "$IMAGES_DIR" && mv "$IMAGES_DIR.tmp" "$IMAGES_DIR"
  log "images built into $IMAGES_DIR in $((SECONDS - start)) s"
fi
echo "$BIN_DIR"
echo "$IMAGES_DIR"
