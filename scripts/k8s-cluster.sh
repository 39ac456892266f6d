#!/usr/bin/env bash
# A throwaway Kubernetes control plane for tests, without containers: kwokctl's "binary" runtime runs
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as local processes on
# 127.0.0.1, from the binaries that scripts/k8s-tools.sh builds (nothing is ever downloaded), and
# kwok fakes the nodes and the pods' lifecycle (pods become Running/Ready at once).
#
#   scripts/k8s-cluster.sh start        create the cluster + 3 fake nodes (2 GPU, 1 CPU); idempotent
#   scripts/k8s-cluster.sh kubeconfig   print the kubeconfig path (export KUBECONFIG=$(... kubeconfig))
#   scripts/k8s-cluster.sh check        prove it works: nodes, Pod Security, a pod becoming Running
#   scripts/k8s-cluster.sh stop         delete the cluster; no process of it is left running
#
# Env: LORAPLANE_CACHE (default ~/.cache/loraplane), LORAPLANE_K8S_CLUSTER (cluster name, default
# loraplane), LORAPLANE_KWOK_WORKDIR (kwokctl's state, default $LORAPLANE_CACHE/kwok).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
NAME="${LORAPLANE_K8S_CLUSTER:-loraplane}"
export KWOK_WORKDIR="${LORAPLANE_KWOK_WORKDIR:-$CACHE/kwok}"
CLUSTER_DIR="$KWOK_WORKDIR/clusters/$NAME"
KUBECONFIG_PATH="$CLUSTER_DIR/kubeconfig.yaml"

log() { printf '[k8s-cluster] %s\n' "$*" >&2; }

BIN="$("$ROOT/scripts/k8s-tools.sh")"
kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# Every binary kwokctl may want points at a local file. etcdctl, etcdutl and kectl are not built
# (only `kwokctl etcdctl|snapshot` use them): pointing at absent local files makes those commands
# fail instead of downloading.
write_config() {
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  bindAddress: 127.0.0.1
  kubeVersion: $("$BIN/kube-apiserver" --version | awk '{print $2}')
  etcdVersion: $("$BIN/etcd" --version | awk '/etcd Version/ {print $3}')
  quietPull: true
  kubeAuthorization: true
  kubeAdmission: true
  kubeApiserverBinary: $BIN/kube-apiserver
  kubeControllerManagerBinary: $BIN/kube-controller-manager
  kubeSchedulerBinary: $BIN/kube-scheduler
  kubectlBinary: $BIN/kubectl
  kwokControllerBinary: $BIN/kwok
  etcdBinary: $BIN/etcd
  etcdctlBinary: $BIN/etcdctl
  etcdutlBinary: $BIN/etcdutl
  kectlBinary: $BIN/kectl
  # PortForward and Logs as CRDs: a test creates them at run time to route a fake pod's port to a
  # local server (the CLI's port-forward through the API server) and to serve a fake container's
  # log from a file (kubectl logs, loraplane train logs).
  enableCRDs: [PortForward, Logs]
EOF
  # Leader election off: a controller-manager or scheduler that misses a lease renewal exits (that
  # is how leader election works) and kwokctl's binary runtime does not restart it. On a loaded
  # 2-core machine (vLLM and a real node beside it) that left a cluster without controllers: new
  # namespaces never got their default ServiceAccount. One instance of each needs no election.
  echo "componentsPatches:"
  local component
  for component in kube-controller-manager kube-scheduler; do
    cat <<EOF
- name: $component
  extraArgs:
  - {key: leader-elect, value: "false"}
EOF
  done
  # Without a default route (a sandbox, a network namespace) kube-apiserver cannot pick an address to
  # advertise and exits: "Unable to find suitable network address". Only then advertise loopback
  # (it then logs that the "kubernetes" Service endpoint may not be loopback; harmless here).
  if ! awk 'NR > 1 && $2 == "00000000" { found = 1 } END { exit !found }' /proc/net/route 2>/dev/null; then
    cat <<EOF
- name: kube-apiserver
  extraArgs:
  - {key: advertise-address, value: 127.0.0.1}
EOF
  fi
  # kwok's default stages plus ours (pods that exit with a chosen code, pods that stay running).
  echo "---"
  cat "$ROOT/tools/k8s/kwok-stages.yaml"
}

# Fake nodes. kwokctl's kwok manages all nodes (the kwok.x-k8s.io/node=fake annotation is what a
# kwok started with --manage-nodes-with-annotation-selector would look for); the stages in
# tools/k8s/kwok-stages.yaml (node-initialize, heartbeat, pod-ready/complete/delete, pod-exit-code)
# make them Ready and their pods Running, Job pods Succeeded, or Failed with a chosen exit code.
nodes() {
  local i
  for i in 0 1; do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: gpu-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels:
    kubernetes.io/hostname: gpu-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.count: "1"
spec:
  taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]
status:
  capacity: {cpu: "16", memory: 64Gi, pods: "110", nvidia.com/gpu: "1"}
  allocatable: {cpu: "16", memory: 64Gi, pods: "110", nvidia.com/gpu: "1"}
EOF
  done
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: cpu-node-0
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {kubernetes.io/hostname: cpu-node-0, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}
status:
  capacity: {cpu: "8", memory: 32Gi, pods: "110"}
  allocatable: {cpu: "8", memory: 32Gi, pods: "110"}
EOF
}

# The pids of the cluster's processes, from kwokctl's pid files (written without a newline).
pids() { local f; for f in "$CLUSTER_DIR"/pids/*.pid; do [ -f "$f" ] && { cat "$f"; echo; }; done; return 0; }

start() {
  local t0=$SECONDS config="$KWOK_WORKDIR/$NAME-kwokctl.yaml"
  mkdir -p "$KWOK_WORKDIR"
  write_config >"$config"
  # --kubeconfig '': leave ~/.kube/config alone; the cluster's own kubeconfig is $KUBECONFIG_PATH.
  # kwokctl runs `kubectl` from PATH (else kubectlBinary) to wait for readiness: $BIN goes first.
  # On failure kwokctl leaves the processes running: keep the logs, then stop them.
  # kwokctl picks free ports, then starts etcd and the rest on them: a cluster starting at the same
  # moment (another test session on this machine) can take one in between. That start fails with
  # "address already in use" in a component's log; it is tried again (three times at most).
  local attempt
  for attempt in 1 2 3; do
    if { PATH="$BIN:$PATH" "$BIN/kwokctl" --config "$config" create cluster --name "$NAME" \
           --kubeconfig '' --wait 120s >&2 &&
         nodes | kubectl apply -f - >&2 &&
         kubectl wait --for=condition=Ready node --all --timeout=120s >&2; }; then
      break
    fi
    rm -rf "$KWOK_WORKDIR/$NAME-logs" && cp -r "$CLUSTER_DIR/logs" "$KWOK_WORKDIR/$NAME-logs" 2>/dev/null || true
    if [ "$attempt" -lt 3 ] && grep -qs "address already in use" "$KWOK_WORKDIR/$NAME-logs"/*.log; then
      log "start failed on a port another process took (attempt $attempt); trying again"
      stop
      continue
    fi
    log "start failed; component logs kept in $KWOK_WORKDIR/$NAME-logs"
    stop
    exit 1
  done
  log "cluster $NAME up in $((SECONDS - t0)) s; export KUBECONFIG=$KUBECONFIG_PATH"
}

# ours PID: the process is alive (not a zombie) and is one of this cluster's (its command line names
# the cluster directory), so that a recycled pid is never touched.
ours() {
  local state
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$state" ] && [ "$state" != Z ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$CLUSTER_DIR"
}

stop() {
  local p i left before
  [ -d "$CLUSTER_DIR" ] || { log "no cluster $NAME"; return 0; }
  before="$(pids)"
  # kwokctl sends the components SIGTERM and returns without waiting for them to exit.
  "$BIN/kwokctl" delete cluster --name "$NAME" >&2
  for i in $(seq 50); do
    left=""
    for p in $before; do ours "$p" && left+=" $p"; done
    [ -z "$left" ] && break
    sleep 0.2
  done
  if [ -n "$left" ]; then
    log "still running 10 s after delete, killing:$left"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
  fi
  log "cluster $NAME deleted"
}

# Proves the cluster is usable: nodes, Pod Security admission enforcing "restricted", a compliant pod
# scheduled and Running, and a GPU pod landing on a fake GPU node.
check() {
  local ns=psa-check out
  kubectl get nodes -o wide
  kubectl delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
  kubectl create namespace "$ns"
  kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=restricted
  # The ServiceAccount admission plugin needs the namespace's default service account.
  until kubectl -n "$ns" get serviceaccount default >/dev/null 2>&1; do sleep 0.2; done

  if out="$(kubectl -n "$ns" apply -f - 2>&1 <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: privileged}
spec:
  containers:
  - {name: c, image: busybox, securityContext: {privileged: true}}
EOF
)"; then
    log "FAIL: a privileged pod was admitted"; return 1
  fi
  echo "privileged pod rejected: $out"
  grep -q 'violates PodSecurity "restricted' <<<"$out" || { log "FAIL: not a Pod Security rejection"; return 1; }

  kubectl -n "$ns" apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: restricted}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: c
    image: busybox
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Pod
metadata: {name: gpu}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  containers:
  - name: c
    image: busybox
    resources: {limits: {nvidia.com/gpu: 1}}
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
EOF
  kubectl -n "$ns" wait --for=condition=Ready pod/restricted pod/gpu --timeout=60s
  kubectl -n "$ns" get pods -o wide
  kubectl -n "$ns" get pod gpu -o jsonpath='{.spec.nodeName}' | grep -q '^gpu-node-' \
    || { log "FAIL: the GPU pod is not on a GPU node"; return 1; }
  kubectl delete namespace "$ns" --wait=false
  log "check passed"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  check) check ;;
  *) echo "usage: $0 start|stop|kubeconfig|check" >&2; exit 2 ;;
esac
