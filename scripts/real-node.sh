#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for tests and for a look by hand: the control
# plane scripts/k8s-tools.sh builds (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
# and a real node from scripts/node-tools.sh: containerd + runc running real containers, the CNI
# bridge plugin on a pod subnet that exists only on this machine, kube-proxy (iptables) for Services,
# CoreDNS as the cluster DNS and kube-router's firewall enforcing NetworkPolicies. Every process runs on the host, listening only on the node's own
# private address; nothing is routed off the machine. Needs root (containerd, iptables, mounts).
#
#   scripts/real-node.sh up           start it (state wiped first); prints the kubeconfig path
#   scripts/real-node.sh down         stop everything, clean the host (iptables, ipsets, mounts,
#                                     cgroups, links, netns, sysctls); state except logs/ removed
#   scripts/real-node.sh kubeconfig   print the admin kubeconfig path
#
# Env: LORAPLANE_CACHE (default ~/.cache/loraplane), LORAPLANE_NODE_WORKDIR (state, logs, PKI;
# default $LORAPLANE_CACHE/node). Only one real node per machine (it owns host-wide names: links,
# iptables chains, the node address): `up` refuses while another one is up.
# It coexists with the kwok test cluster (scripts/k8s-cluster.sh): other address, ports and dirs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
WORK="${LORAPLANE_NODE_WORKDIR:-$CACHE/node}"

NODE_NAME=lp-node
NODE_IP=10.254.253.1             # host-only: held by an empty bridge, never routed off the machine
POD_CIDR=10.244.253.0/24         # the CNI bridge's subnet
POD_GW=10.244.253.1
SERVICE_CIDR=10.97.0.0/16        # ClusterIPs; routed into the host-only bridge, kube-proxy DNATs them
API_SERVICE_IP=10.97.0.1
HOST_LINK=lp-node0               # no `dummy` link type in this kernel: a port-less bridge holds NODE_IP
POD_BRIDGE=lp-cni0
CNI_NETWORK=lp-pods
HOST_STATE=/run/loraplane-node   # host-wide: which work dir owns the node, sysctls and netns before it
PAUSE_IMAGE=localhost/loraplane/pause:local
HOST_DIRS=(/run/containerd /run/netns /var/lib/cni)
# Sysctls that kubelet, kube-proxy and the CNI bridge may change; restored by `down`.
SYSCTLS=(net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.ipv4.conf.all.route_localnet
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables vm.overcommit_memory
  vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait net.netfilter.nf_conntrack_tcp_be_liberal)

log() { printf '[real-node %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

# --- processes: started with setsid, pid in $WORK/run/NAME.pid ---------------------------------------
# ours DIR PID: alive (not a zombie) and started from DIR (its command line names it): a recycled pid
# is never signalled.
ours() {
  local state
  state="$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$state" ] && [ "$state" != Z ] && tr '\0' ' ' 2>/dev/null <"/proc/$2/cmdline" | grep -qF "$1"
}
pidof_() { [ -f "$2/run/$1.pid" ] && cat "$2/run/$1.pid"; }
alive() { local p; p="$(pidof_ "$1" "$2")" && ours "$2" "$p"; }
start() {   # NAME CMD...
  local name="$1"; shift
  setsid "$@" >"$WORK/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$WORK/run/$name.pid"
}
waitfor() {   # WHAT SECONDS CMD...: polls CMD every 0.2 s; fails at the deadline or when a component exits
  local what="$1" limit="$2" i f; shift 2
  for ((i = 0; i < limit * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    for f in "$WORK"/run/*.pid; do
      [ -f "$f" ] || continue
      if ! ours "$WORK" "$(cat "$f")"; then
        f="$(basename "$f" .pid)"
        tail -n 15 "$WORK/logs/$f.log" >&2 || true
        die "$f exited while waiting for $what (log: $WORK/logs/$f.log)"
      fi
    done
    sleep 0.2
  done
  die "timed out after ${limit} s waiting for $what (logs: $WORK/logs)"
}
stop() {   # DIR NAME...: SIGTERM to all, up to 20 s for them to exit, then SIGKILL
  local dir="$1" n p i left; shift
  local -a pids=()
  for n in "$@"; do
    p="$(pidof_ "$n" "$dir")" || continue
    ours "$dir" "$p" && { kill -TERM "$p" 2>/dev/null || true; pids+=("$p"); }
  done
  for ((i = 0; i < 100; i++)); do
    left=""
    for p in "${pids[@]}"; do ours "$dir" "$p" && left+=" $p"; done
    [ -z "$left" ] && break
    sleep 0.2
  done
  for p in $left; do log "still running 20 s after SIGTERM, killing $p"; kill -KILL "$p" 2>/dev/null || true; done
  for n in "$@"; do rm -f "$dir/run/$n.pid"; done
  [ ${#pids[@]} -eq 0 ] || log "stopped $*"
}

# --- PKI: a CA, serving certs for the API server and the kubelet, the API server's kubelet client
# cert, the service-account key, static tokens for the components. EC keys (fast); all in $WORK/pki.
pki() {
  local p="$WORK/pki" u
  mkdir -p "$p"
  ( cd "$p"
    key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null; }
    cert() {   # NAME SUBJECT EXTENSIONS
      key "$1"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 -out "$1.crt" \
        -extfile "$1.ext" 2>/dev/null
    }
    key ca
    openssl req -x509 -new -key ca.key -subj /CN=loraplane-node-ca -days 7 -out ca.crt 2>/dev/null
    cert apiserver /CN=kube-apiserver "$(printf '%s\n' \
      "subjectAltName=IP:$NODE_IP,IP:$API_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      extendedKeyUsage=serverAuth)"
    cert kubelet "/CN=system:node:$NODE_NAME" "$(printf '%s\n' "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME" \
      extendedKeyUsage=serverAuth)"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" extendedKeyUsage=clientAuth
    key sa
    openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext ca.srl
  )
  token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  : >"$p/tokens.csv"
  chmod 600 "$p/tokens.csv"
  # user name, kubeconfig name, groups
  for u in "admin admin system:masters" "system:node:$NODE_NAME kubelet system:nodes" \
           "system:kube-proxy kube-proxy -" "system:kube-controller-manager controller-manager -" \
           "system:kube-scheduler scheduler -" "system:coredns coredns -" "system:kube-router kube-router -"; do
    set -- $u
    local t; t="$(token)"
    if [ "$3" = - ]; then echo "$t,$1,$1" >>"$p/tokens.csv"; else echo "$t,$1,$1,\"$3\"" >>"$p/tokens.csv"; fi
    cat >"$p/$2.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: $NODE_NAME, cluster: {server: "https://$NODE_IP:6443", certificate-authority: $p/ca.crt}}]
users: [{name: $2, user: {token: "$t"}}]
contexts: [{name: $NODE_NAME, context: {cluster: $NODE_NAME, user: $2}}]
current-context: $NODE_NAME
EOF
  done
}

# --- configuration files, rendered into $WORK/etc ---------------------------------------------------
configs() {
  local e="$WORK/etc" snapshotter="$1"
  mkdir -p "$e/cni"
  # containerd 1.6 (Debian): its own root, state and socket (no clash with a system containerd).
  cat >"$e/containerd.toml" <<EOF
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$WORK/run/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "$NODE_IP"
  stream_server_port = "0"
  enable_cdi = false
  # This machine's capability bounding set lacks CAP_SYS_RESOURCE: runc cannot lower a pod's
  # oom_score_adj below containerd's own ("can't get final child's PID from pipe" on every sandbox).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "$snapshotter"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$WORK/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$e/cni"
EOF
  cat >"$e/cni/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge", "bridge": "$POD_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
               "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$WORK/cni-ipam"}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # cgroup v1 here (no systemd): kubelet >= 1.35 refuses v1 unless failCgroupV1 is false.
  cat >"$e/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix://$WORK/run/containerd.sock
failSwapOn: false
memorySwap: {swapBehavior: NoSwap}
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: $NODE_IP
healthzPort: 10248
tlsCertFile: $WORK/pki/kubelet.crt
tlsPrivateKeyFile: $WORK/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $WORK/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: ""
podLogsDir: $WORK/pod-logs
hairpinMode: hairpin-veth
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
maxPods: 50
podPidsLimit: 4096
EOF
  cat >"$e/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: $NODE_IP:10256
metricsBindAddress: $NODE_IP:10249
clientConnection: {kubeconfig: $WORK/pki/kube-proxy.kubeconfig}
iptables: {localhostNodePorts: false, masqueradeAll: false}   # no route_localnet
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}   # host's left alone
nodePortAddresses: ["$NODE_IP/32"]
EOF
  # Cluster DNS as a host process on the node address; no forward plugin: only cluster names resolve.
  cat >"$e/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health $NODE_IP:8080
    ready $NODE_IP:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $WORK/pki/coredns.kubeconfig
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}

# Read access for CoreDNS (Services, EndpointSlices, Namespaces) and kube-router's firewall (the pods,
# namespaces and NetworkPolicies it turns into iptables rules and ipsets).
RBAC='
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [services, endpoints, namespaces, pods], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:kube-router"}
rules:
- {apiGroups: [""], resources: [pods, namespaces, nodes, services, endpoints], verbs: [get, list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [get, list, watch]}
- {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-router"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-router"}]
'

# overlayfs on the work dir's filesystem (not when the work dir itself is on overlayfs, as in some
# containers): else containerd's native snapshotter (full copies, slower, always works).
pick_snapshotter() {
  local d="$WORK/overlay-probe" ok=native
  mkdir -p "$d"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" "$d/merged" 2>/dev/null; then
    umount "$d/merged"
    ok=overlayfs
  fi
  rm -rf "$d"
  echo "$ok"
}

up() {
  local t0=$SECONDS bin nodebin images snapshotter owner
  [ "$(id -u)" -eq 0 ] || die "the real node needs root (containerd, runc, iptables, mounts)"
  if [ -f "$HOST_STATE/owner" ]; then
    owner="$(cat "$HOST_STATE/owner")"
    if alive kube-apiserver "$owner" || alive containerd "$owner" || alive kubelet "$owner"; then
      die "a real node is already up (work dir $owner): LORAPLANE_NODE_WORKDIR=$owner $0 down"
    fi
    log "cleaning up after a node that did not go down (work dir $owner)"
    # `down` acts on $WORK: run it in a subshell for the dead owner's work dir (an env prefix on a
    # function call would not change $WORK, and `down` would refuse a node that is not ours).
    (WORK="$owner"; down) || die "could not clean up after the node in $owner (see above)"
  fi
  bin="$(bash "$ROOT/scripts/k8s-tools.sh")"
  { read -r nodebin; read -r images; } < <(bash "$ROOT/scripts/node-tools.sh")
  [ -n "$images" ] || die "scripts/node-tools.sh failed"

  # Fresh state each time: a Node object left by an earlier run would look Ready at once. Only a
  # directory this script made (marker file) or an empty one is wiped, and never across a mount.
  mkdir -p "$WORK"
  WORK="$(cd "$WORK" && pwd)"
  if [ -n "$(ls -A "$WORK")" ] && [ ! -f "$WORK/.loraplane-node" ]; then
    die "$WORK is not empty and not a real node's work dir: set LORAPLANE_NODE_WORKDIR to a new directory"
  fi
  findmnt -rn -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1' | sort -r | xargs -r umount -l
  rm -rf "$WORK"
  mkdir -p "$WORK"/{run,logs,pod-logs,cni-ipam} "$HOST_STATE"
  touch "$WORK/.loraplane-node"
  echo "$WORK" >"$HOST_STATE/owner"
  # From here on a failed start stops what it started (the logs stay in $WORK/logs).
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed; stopping what started"; down || true; fi' EXIT
  sysctl -e "${SYSCTLS[@]}" 2>/dev/null | sed 's/ = /=/' >"$HOST_STATE/sysctl-before"
  ip netns list 2>/dev/null | awk '{print $1}' >"$HOST_STATE/netns-before"
  # Host directories the runtime creates whatever its config (containerd 1.6's shim sockets in
  # /run/containerd/s, CRI's /run/netns, libcni's result cache): `down` removes those this node made.
  for d in "${HOST_DIRS[@]}"; do [ -e "$d" ] || echo "$d"; done >"$HOST_STATE/made-dirs"
  snapshotter="$(pick_snapshotter)"
  pki
  configs "$snapshotter"
  local ctr=(ctr --address "$WORK/run/containerd.sock" --namespace k8s.io)
  kctl() { "$bin/kubectl" --kubeconfig "$WORK/pki/admin.kubeconfig" "$@"; }

  ip link add "$HOST_LINK" type bridge
  ip addr add "$NODE_IP/32" dev "$HOST_LINK"
  ip link set "$HOST_LINK" up
  # ClusterIPs go into the host-only bridge (= dropped) unless kube-proxy DNATs them: never via eth0.
  ip route replace "$SERVICE_CIDR" dev "$HOST_LINK" src "$NODE_IP"
  # Pods may talk to each other and to the host, nothing is forwarded out of the pod bridge.
  iptables -I FORWARD -i "$POD_BRIDGE" ! -o "$POD_BRIDGE" -j DROP

  start containerd containerd --config "$WORK/etc/containerd.toml"
  waitfor containerd 30 "${ctr[@]}" version
  "${ctr[@]}" images import --snapshotter "$snapshotter" --base-name localhost/loraplane/pause "$images/pause.tar" >/dev/null
  "${ctr[@]}" images import --snapshotter "$snapshotter" --base-name localhost/loraplane/busybox "$images/busybox.tar" >/dev/null
  log "containerd up ($snapshotter snapshotter), images imported"

  start etcd "$bin/etcd" --name "$NODE_NAME" --data-dir "$WORK/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://$NODE_IP:2379" --advertise-client-urls "http://$NODE_IP:2379" \
    --listen-peer-urls "http://$NODE_IP:2380" --initial-advertise-peer-urls "http://$NODE_IP:2380" \
    --initial-cluster "$NODE_NAME=http://$NODE_IP:2380"
  local p="$WORK/pki"
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://$NODE_IP:2379" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --token-auth-file "$p/tokens.csv" --authorization-mode Node,RBAC --allow-privileged=true \
    --service-account-issuer https://kubernetes.default.svc.cluster.local --service-account-key-file "$p/sa.pub" \
    --service-account-signing-key-file "$p/sa.key" --service-cluster-ip-range "$SERVICE_CIDR" \
    --kubelet-preferred-address-types InternalIP --kubelet-certificate-authority "$p/ca.crt" \
    --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" --kubelet-client-key "$p/apiserver-kubelet-client.key" \
    --profiling=false
  waitfor kube-apiserver 60 kctl get --raw /readyz
  log "kube-apiserver ready"
  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$p/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$p/controller-manager.kubeconfig" --authorization-kubeconfig "$p/controller-manager.kubeconfig" \
    --bind-address "$NODE_IP" --secure-port 10257 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" --allocate-node-cidrs=false \
    --controllers '*,-cloud-node-lifecycle-controller' --profiling=false
  start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$p/scheduler.kubeconfig" \
    --authentication-kubeconfig "$p/scheduler.kubeconfig" --authorization-kubeconfig "$p/scheduler.kubeconfig" \
    --bind-address "$NODE_IP" --secure-port 10259 --leader-elect=false --profiling=false
  kctl apply -f - >/dev/null <<<"$RBAC"
  start coredns "$nodebin/coredns" -conf "$WORK/etc/Corefile"
  start kubelet "$nodebin/kubelet" --config "$WORK/etc/kubelet.yaml" --kubeconfig "$p/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$WORK/kubelet" --cert-dir "$WORK/kubelet/pki" --v=1
  start kube-proxy "$nodebin/kube-proxy" --config "$WORK/etc/kube-proxy.yaml" --v=1
  waitfor "node $NODE_NAME Ready" 90 kctl wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
  # NetworkPolicy (the bridge CNI ignores it): kube-router's firewall only (no BGP routing, no service
  # proxy, no CNI config, no health or metrics listener). It needs the Node object: started after it.
  start kube-router "$nodebin/kube-router" --kubeconfig "$p/kube-router.kubeconfig" --hostname-override "$NODE_NAME" \
    --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
    --health-port=0 --metrics-port=0 --service-cluster-ip-range "$SERVICE_CIDR"
  waitfor "CoreDNS ready" 30 bash -c "exec 3<>/dev/tcp/$NODE_IP/8181"
  waitfor "kube-proxy healthy" 30 bash -c "exec 3<>/dev/tcp/$NODE_IP/10256"
  waitfor "kube-router's firewall" 30 iptables -S KUBE-ROUTER-FORWARD
  waitfor "the default service account" 30 kctl -n default get serviceaccount default
  trap - EXIT
  log "node $NODE_NAME up in $((SECONDS - t0)) s; export KUBECONFIG=$WORK/pki/admin.kubeconfig"
  echo "$WORK/pki/admin.kubeconfig"
}

# KUBE-* (kube-proxy, kubelet) and CNI-* (portmap) chains: jumps from the built-in chains removed,
# then the chains flushed and deleted.
clean_chains() {
  local ipt t rule ch
  for ipt in iptables ip6tables; do
    for t in raw mangle nat filter; do
      { "$ipt" -t "$t" -S 2>/dev/null || true; } | awk '$1 == "-A" && $2 !~ /^(KUBE|CNI)-/ && / -j (KUBE|CNI)-/' |
        while read -r rule; do
          eval "$ipt -t $t ${rule/-A /-D }" 2>/dev/null || true
        done
      for ch in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        "$ipt" -t "$t" -F "$ch" 2>/dev/null || true
      done
      for ch in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        "$ipt" -t "$t" -X "$ch" 2>/dev/null && log "removed $ipt $t $ch" || true
      done
    done
  done
}

down() {
  local t0=$SECONDS c m n bin="" nodebin="" ctrd=0 d
  [ "$(id -u)" -eq 0 ] || die "the real node needs root to go down"
  [ -d "$WORK" ] && WORK="$(cd "$WORK" && pwd)"
  if [ -f "$HOST_STATE/owner" ] && [ "$(cat "$HOST_STATE/owner")" != "$WORK" ]; then
    die "the real node here belongs to $(cat "$HOST_STATE/owner"): LORAPLANE_NODE_WORKDIR=$(cat "$HOST_STATE/owner") $0 down"
  fi
  local ctr=(ctr --address "$WORK/run/containerd.sock" --namespace k8s.io)
  local kc="$WORK/pki/admin.kubeconfig"
  bin="$(bash "$ROOT/scripts/k8s-tools.sh" 2>/dev/null)" || true
  nodebin="$(bash "$ROOT/scripts/node-tools.sh" 2>/dev/null | head -1)" || true
  alive containerd "$WORK" && timeout 5 "${ctr[@]}" version >/dev/null 2>&1 && ctrd=1

  # 1. Pods away while the kubelet still runs: it stops the sandboxes (CNI DEL, volume unmounts).
  if [ -n "$bin" ] && alive kube-apiserver "$WORK" && "$bin/kubectl" --kubeconfig "$kc" get --raw /readyz >/dev/null 2>&1; then
    stop "$WORK" kube-controller-manager kube-scheduler   # nothing recreates or reschedules pods now
    "$bin/kubectl" --kubeconfig "$kc" delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
    for ((c = 0; c < 150; c++)); do
      [ "$ctrd" = 1 ] && [ -n "$("${ctr[@]}" tasks ls -q 2>/dev/null)" ] || break
      sleep 0.2
    done
    log "pods gone after $((SECONDS - t0)) s"
  fi
  stop "$WORK" kube-router kube-proxy kubelet kube-controller-manager kube-scheduler
  [ -n "$nodebin" ] && [ -x "$nodebin/kube-proxy" ] && "$nodebin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  # 2. Anything still in containerd: tasks killed, containers deleted (their shims exit with them).
  if [ "$ctrd" = 1 ]; then
    for c in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill -s SIGKILL "$c" 2>/dev/null || true; done
    for c in $("${ctr[@]}" containers ls -q 2>/dev/null); do
      "${ctr[@]}" tasks delete -f "$c" >/dev/null 2>&1 || true
      "${ctr[@]}" containers delete "$c" >/dev/null 2>&1 || true
    done
  fi
  # 3. The API server before etcd: on SIGTERM it still writes to etcd (endpoint reconciler).
  stop "$WORK" containerd coredns kube-apiserver
  stop "$WORK" etcd
  # Shims orphaned by a containerd that died: their command line names our containerd's state.
  for c in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $WORK/run/containerd.sock" || true); do
    log "killing orphaned shim $c"; kill -KILL "$c" 2>/dev/null || true
  done

  # 4. Mounts (deepest first), network namespaces CRI created, links, iptables, cgroups, sysctls.
  findmnt -rn -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1' | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  if [ -f "$HOST_STATE/netns-before" ]; then
    for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do
      grep -qxF "$n" "$HOST_STATE/netns-before" || { ip netns delete "$n" 2>/dev/null && log "deleted netns $n"; }
    done
  fi
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  ip link del "$HOST_LINK" 2>/dev/null || true
  while iptables -D FORWARD -i "$POD_BRIDGE" ! -o "$POD_BRIDGE" -j DROP 2>/dev/null; do :; done
  clean_chains
  # kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*; inet6: for IPv6), free once no rule uses them.
  for c in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-' || true); do
    ipset destroy "$c" 2>/dev/null && log "destroyed ipset $c" || true
  done
  # Containers whose shim died with containerd live on in the pod cgroups: killed, then the cgroups go.
  for c in $(cat /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs \
      /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs 2>/dev/null | sort -u); do
    log "killing pid $c left in the pod cgroups"; kill -KILL "$c" 2>/dev/null || true
  done
  for d in /sys/fs/cgroup/*/kubepods; do
    [ -d "$d" ] || continue
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$d" ] && log "cgroup left: $d"
  done
  if [ -f "$HOST_STATE/sysctl-before" ]; then
    sysctl -q -e -p "$HOST_STATE/sysctl-before" >/dev/null 2>&1 || true
  fi
  rm -rf /var/lib/cni/networks/"$CNI_NETWORK"
  find /var/lib/cni/results -name "$CNI_NETWORK-*" -delete 2>/dev/null || true
  if [ -f "$HOST_STATE/made-dirs" ]; then
    while read -r d; do
      if mountpoint -q "$d"; then umount "$d" 2>/dev/null || true; fi
      # The runtime's own dirs go whole (a shim killed with containerd leaves its socket, a pod that
      # never got its CNI DEL its cached result); a netns dir only when nothing else is in it.
      case "$d" in
        /run/netns) find "$d" -depth -type d -empty -delete 2>/dev/null || true ;;
        *) rm -rf "$d" ;;
      esac
      if [ -e "$d" ]; then log "left (not empty): $d"; fi
    done <"$HOST_STATE/made-dirs"
  fi
  rm -rf "$HOST_STATE"
  # State removed (logs kept for a look): nothing of the node is left but $WORK/logs.
  if [ -d "$WORK" ]; then
    find "$WORK" -mindepth 1 -maxdepth 1 ! -name logs ! -name .loraplane-node -exec rm -rf {} + 2>/dev/null || true
  fi
  log "down in $((SECONDS - t0)) s"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  kubeconfig) echo "$WORK/pki/admin.kubeconfig" ;;
  *) echo "usage: $0 up|down|kubeconfig" >&2; exit 2 ;;
esac
