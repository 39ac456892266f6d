"""A real single-node Kubernetes cluster for tests (scripts/real-node.sh): real kubelet, containerd, runc,
CNI bridge, kube-proxy, CoreDNS and kube-router's NetworkPolicy firewall on this machine. One per test
session (the ``real_node`` fixture in conftest.py); what it leaves on the host after going down is
checked (:func:`leftovers`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kube_client import KubeClient

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "real-node.sh"
CACHE = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))
BUSYBOX = "localhost/loraplane/busybox:local"
NODE_NAME = "lp-node"
# Pod Security "restricted": non-root, no privilege escalation, no capabilities, the runtime's seccomp.
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 65534,
    "runAsGroup": 65534,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# The sysctls scripts/real-node.sh restores (kubelet, kube-proxy and the CNI bridge may set them).
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.netfilter.nf_conntrack_max",
)


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def host_state(work: Path) -> dict[str, set[str]]:
    """What a node can leave on the host: rules, mounts, cgroups, links, routes, netns, processes, sysctls,
    ipsets."""
    rules = {
        f"{ipt} -t {table} {line}"
        for ipt in ("iptables", "ip6tables")
        for table in ("raw", "mangle", "nat", "filter")
        for line in _run(ipt, "-t", table, "-S").splitlines()
        if not line.startswith("-P ")
    }
    ours = re.compile(rf"^({re.escape(str(work))}|/run/netns/cni-)|kubelet|containerd")
    mounts = {m for m in _run("findmnt", "-rn", "-o", "TARGET").splitlines() if ours.search(m)}
    cgroups = {str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")}
    links = {line.split()[0] for line in _run("ip", "-br", "link").splitlines() if line.strip()}
    routes = set(_run("ip", "route").splitlines()) | set(_run("ip", "-6", "route").splitlines())
    netns = {line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()}
    processes = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(work) in cmdline:
                    processes.add(f"{proc.name}: {cmdline.strip()}")
    sysctls = set(_run("sysctl", "-e", *SYSCTLS).splitlines())
    ipsets = set(_run("ipset", "list", "-n").splitlines())
    paths = (
        "/run/loraplane-node",
        "/run/containerd",
        "/run/netns",
        "/var/lib/cni",
        "/var/lib/cni/networks/lp-pods",
    )
    files = {p for p in paths if Path(p).exists()}
    files |= {
        str(p) for p in Path("/var/lib/cni/results").glob("*") if "lp-pods-" in p.name or "loopback" in p.name
    }
    return {
        "iptables rules": rules,
        "mounts": mounts,
        "cgroups": cgroups,
        "links": links,
        "routes": routes,
        "network namespaces": netns,
        "processes": processes,
        "sysctls": sysctls,
        "ipsets": ipsets,
        "files": files,
    }


def leftovers(before: dict[str, set[str]], after: dict[str, set[str]]) -> list[str]:
    """Everything in ``after`` that was not in ``before`` (a changed sysctl shows its new value)."""
    return [f"{kind}: {item}" for kind, items in after.items() for item in sorted(items - before[kind])]


@dataclass
class RealNode(KubeClient):
    """The live cluster: its admin kubeconfig, the kubectl next to the control plane, its work dir."""

    work: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float | None = 120
    ) -> subprocess.CompletedProcess[str]:
        return super().kubectl(*args, stdin=stdin, check=check, timeout=timeout)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, namespace: str, *objects: dict[str, Any]) -> None:
        listed = {"apiVersion": "v1", "kind": "List", "items": objects}
        self.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(listed))

    def restricted_namespace(self, name: str) -> str:
        """A namespace that enforces Pod Security ``restricted``, ready for pods (its default SA exists)."""
        self.kubectl("create", "namespace", name)
        self.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
        self.wait_for(
            lambda: self.kubectl("-n", name, "get", "sa", "default", check=False).returncode == 0,
            f"the default service account of {name}",
        )
        return name

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        from support import wait_until

        wait_until(condition, what, timeout=timeout, every=0.3)

    def pod_phase(self, namespace: str, pod: str, phases: set[str], timeout: float = 60.0) -> dict[str, Any]:
        """The pod once its phase is one of ``phases`` (the failure names the phase it was stuck in)."""
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.get("-n", namespace, "pod", pod))
            return seen.get("status", {}).get("phase") in phases

        self.wait_for(reached, f"pod {namespace}/{pod} to reach {sorted(phases)}", timeout)
        return seen

    def logs(self, namespace: str, target: str) -> str:
        return self.kubectl("-n", namespace, "logs", target).stdout

    def diagnostics(self) -> str:
        """Events, pods and every container's log in the cluster, and the node components' log tails."""
        out = []
        for args in (
            ("get", "pods", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            proc = self.kubectl(*args, check=False, timeout=30)
            out.append(f"$ kubectl {' '.join(args)}\n{proc.stdout}{proc.stderr}")
        pods = self.kubectl("get", "pods", "-A", "-o", "json", check=False, timeout=30)
        for pod in json.loads(pods.stdout or '{"items": []}')["items"]:
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            logs = self.kubectl(
                "-n", ns, "logs", name, "--all-containers", "--prefix", "--tail=50", check=False, timeout=30
            )
            out.append(f"$ kubectl -n {ns} logs {name}\n{logs.stdout}{logs.stderr}")
        for component in ("kubelet", "containerd", "kube-proxy", "coredns", "kube-router"):
            log = self.work / "logs" / f"{component}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-25:]
                out.append(f"$ tail {log}\n" + "\n".join(tail))
        return "\n\n".join(out)


def session(work: Path) -> Iterator[RealNode]:
    """Start the node (one per machine at a time: sessions queue on a lock), yield it, tear it down, then
    fail if anything is left on the host."""
    if os.geteuid() != 0:
        pytest.skip("the real node needs root (containerd, runc, iptables, mounts)")
    tools = subprocess.run(["bash", str(ROOT / "scripts" / "k8s-tools.sh")], capture_output=True, text=True)
    assert tools.returncode == 0, tools.stderr[-3000:]
    images = subprocess.run(["bash", str(ROOT / "scripts" / "node-tools.sh")], capture_output=True, text=True)
    assert images.returncode == 0, images.stderr[-3000:]
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "real-node.lock").open("w") as lock:
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "another test session kept the real node for 30 min"
                time.sleep(1)
        env = {**os.environ, "LORAPLANE_NODE_WORKDIR": str(work)}
        before = host_state(work)
        node = RealNode(work / "pki" / "admin.kubeconfig", Path(tools.stdout.strip()), work)
        try:
            up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, env=env)
            assert up.returncode == 0, f"real-node.sh up failed:\n{up.stderr[-4000:]}\n{node.diagnostics()}"
            yield node
        finally:
            down = subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, env=env)
            assert down.returncode == 0, f"real-node.sh down failed:\n{down.stderr[-4000:]}"
            left = leftovers(before, host_state(work))
            assert not left, "the real node left on the host:\n" + "\n".join(left) + "\n" + down.stderr


def report_failure(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failed test that used the real node gets the cluster's events and container logs in its report."""
    node = getattr(item, "funcargs", {}).get("real_node")
    if report.failed and report.when != "teardown" and isinstance(node, RealNode):
        report.sections.append(("real node: pods, events, container logs", node.diagnostics()))
