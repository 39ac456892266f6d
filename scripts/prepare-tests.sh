#!/usr/bin/env bash
# Everything the test command needs, set up at once: the Python environment and helm (setup.sh),
# the Kubernetes test control plane (k8s-tools.sh), Prometheus (prometheus-tools.sh) and, as root, the real test node's tools
# (node-tools.sh: Debian packages with apt-get, kubelet, kube-proxy, CoreDNS, kube-router, two tiny
# images). On a fresh machine setup runs side by side with the two Go builds: setup is mostly
# downloads and unpacking, the builds are CPU-bound Go compilation (~16 min on 2 cores for the control
# plane, then ~7 min for the node: kubelet and kube-proxy reuse the control plane's Go build cache, so
# they follow it rather than compete with it). On a machine that ran them once, all return in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[prepare] %s\n' "$*" >&2; }
build_tools() {
  bash "$ROOT/scripts/k8s-tools.sh" >/dev/null \
    || { log "the Kubernetes tools build failed; see [k8s-tools] above"; return 1; }
  # Prometheus and promtool for tests/test_monitoring*.py (reuses the Go module and build caches)
  bash "$ROOT/scripts/prometheus-tools.sh" >/dev/null \
    || { log "the Prometheus build failed; see [prometheus-tools] above"; return 1; }
  if [ "$(id -u)" -ne 0 ]; then
    log "not root: the real node's tools are not set up (tests marked node need root; they skip)"
    return 0
  fi
  bash "$ROOT/scripts/node-tools.sh" >/dev/null \
    || { log "the real node's tools failed; see [node-tools] above"; return 1; }
}

build_tools &
tools_pid=$!
setup_rc=0
bash "$ROOT/scripts/setup.sh" || setup_rc=$?
tools_rc=0
wait "$tools_pid" || tools_rc=$?
if [ "$setup_rc" -ne 0 ] || [ "$tools_rc" -ne 0 ]; then
  [ "$setup_rc" -eq 0 ] || log "setup failed (exit $setup_rc); see [setup] above"
  exit 1
fi
