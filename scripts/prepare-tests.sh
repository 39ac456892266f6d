#!/usr/bin/env bash
# Everything the test command needs, set up at once: the Python environment and helm (setup.sh)
# and the Kubernetes test control plane (k8s-tools.sh). On a fresh machine the two run side by
# side: setup is mostly downloads and unpacking, the control plane build is CPU-bound Go
# compilation (~16 min on 2 cores), so running them together saves most of setup's time.
# On a machine that ran them once, both return within seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$ROOT/scripts/k8s-tools.sh" >/dev/null &
k8s_pid=$!
setup_rc=0
bash "$ROOT/scripts/setup.sh" || setup_rc=$?
k8s_rc=0
wait "$k8s_pid" || k8s_rc=$?
if [ "$setup_rc" -ne 0 ] || [ "$k8s_rc" -ne 0 ]; then
  [ "$setup_rc" -eq 0 ] || echo "[prepare] setup failed (exit $setup_rc); see [setup] above" >&2
  [ "$k8s_rc" -eq 0 ] || echo "[prepare] the Kubernetes tools build failed (exit $k8s_rc); see [k8s-tools] above" >&2
  exit 1
fi
