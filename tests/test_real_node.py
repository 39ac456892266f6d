"""The real single-node cluster (scripts/real-node.sh): a real kubelet runs real containers under containerd
and runc, pods get addresses from the CNI bridge, Services work through kube-proxy, cluster DNS through
CoreDNS and NetworkPolicies through kube-router. A failed test's report carries the cluster's events and
container logs (conftest's hook)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from real_node import BUSYBOX, NODE_NAME, RESTRICTED_CONTAINER, RESTRICTED_POD, ROOT, RealNode
from support import http

pytestmark = [pytest.mark.node]


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    """A restricted busybox pod that runs ``script`` once."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": RESTRICTED_POD,
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
            **spec,
        },
    }


def job(name: str, script: str) -> dict[str, Any]:
    template = pod(name, script)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}},
    }


@pytest.fixture(scope="module")
def ns(real_node: RealNode) -> str:
    return real_node.restricted_namespace(f"node-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def web(real_node: RealNode, ns: str) -> str:
    """A web server Deployment (busybox httpd answering with its pod name) and its Service, Ready."""
    www = 'mkdir /tmp/www && echo "hello from $(hostname)" >/tmp/www/index.html'
    script = f"{www} && exec httpd -f -p 8080 -h /tmp/www"
    spec = pod("web", script, terminationGracePeriodSeconds=1, restartPolicy="Always")["spec"]
    spec["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/index.html", "port": 8080},
        "periodSeconds": 1,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    real_node.apply(ns, deployment, service)
    real_node.kubectl("-n", ns, "rollout", "status", "deployment/web", "--timeout=60s", timeout=90)
    pods = real_node.get("-n", ns, "pods", "-l", "app=web")["items"]
    assert len(pods) == 1
    return str(pods[0]["metadata"]["name"])


def test_one_ready_node_with_a_real_kubelet_and_containerd(real_node: RealNode) -> None:
    nodes = real_node.get("nodes")["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE_NAME]
    node = nodes[0]
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
    info = node["status"]["nodeInfo"]
    assert re.fullmatch(r"containerd://\d+\.\d+\.\d+.*", info["containerRuntimeVersion"]), info
    server = real_node.kubectl("version", "-o", "json").stdout
    assert f'"gitVersion": "{info["kubeletVersion"]}"' in server, (info, server)
    # What a kwok node never has: a kubelet serving on the node's address, and capacity measured from
    # this machine's cgroups rather than declared.
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert info["kernelVersion"] == os.uname().release


def test_restricted_namespace_runs_a_non_root_pod_and_returns_its_logs(real_node: RealNode, ns: str) -> None:
    # Pod Security "restricted" is enforced: a privileged pod is refused at admission...
    refused = real_node.kubectl(
        "-n",
        ns,
        "apply",
        "-f",
        "-",
        stdin='{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"}, "spec": {"containers":'
        f' [{{"name": "c", "image": "{BUSYBOX}", "securityContext": {{"privileged": true}}}}]}}}}',
        check=False,
    )
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr, refused.stderr
    # ...and a compliant one runs in a real container: its own uid, pid namespace and pod cgroup.
    script = (
        'echo "uid=$(id -u) gid=$(id -g) pid1=$(tr "\\0" " " </proc/1/cmdline | cut -c1-10)"; '
        "grep memory /proc/self/cgroup"
    )
    real_node.apply(ns, pod("whoami", script))
    done = real_node.pod_phase(ns, "whoami", {"Succeeded", "Failed"})
    logs = real_node.logs(ns, "whoami")
    assert done["status"]["phase"] == "Succeeded", logs
    assert "uid=65534 gid=65534 pid1=/bin/sh -c\n" in logs  # the pod's command is pid 1 of its own
    assert f"/kubepods/besteffort/pod{done['metadata']['uid']}/" in logs


def test_a_pod_reaches_a_service_by_name_through_coredns_and_kube_proxy(
    real_node: RealNode, ns: str, web: str
) -> None:
    fqdn = f"web.{ns}.svc.cluster.local"
    cluster_ip = real_node.get("-n", ns, "service", "web")["spec"]["clusterIP"]
    script = (
        f"nslookup {fqdn} && for name in {fqdn} web; do"
        "  printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 $name 80 | tail -1; done"
    )
    real_node.apply(ns, pod("client", script))
    done = real_node.pod_phase(ns, "client", {"Succeeded", "Failed"})
    logs = real_node.logs(ns, "client")
    assert done["status"]["phase"] == "Succeeded", logs
    assert f"Address: {cluster_ip}" in logs, logs  # CoreDNS answered with the Service's ClusterIP
    assert logs.count(f"hello from {web}\n") == 2, logs  # kube-proxy took both names to the pod


def test_port_forward_reaches_a_pod_from_this_machine(real_node: RealNode, ns: str, web: str) -> None:
    with port_forward(real_node, ns, f"pod/{web}", 8080) as port:
        reply = http().get(f"http://127.0.0.1:{port}/index.html")
    assert reply.status_code == 200
    assert reply.text == f"hello from {web}\n"


def test_jobs_complete_and_a_failed_jobs_pod_reports_its_exit_code(real_node: RealNode, ns: str) -> None:
    real_node.apply(ns, job("ok", "echo job-ran"), job("fails", "echo failing; exit 3"))
    real_node.kubectl("-n", ns, "wait", "--for=condition=Complete", "job/ok", "--timeout=60s", timeout=90)
    assert real_node.logs(ns, "job/ok") == "job-ran\n"
    real_node.kubectl("-n", ns, "wait", "--for=condition=Failed", "job/fails", "--timeout=60s", timeout=90)
    pods = real_node.get("-n", ns, "pods", "-l", "job-name=fails")["items"]
    assert len(pods) == 1  # backoffLimit 0: not retried
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error"), terminated
    assert real_node.logs(ns, pods[0]["metadata"]["name"]) == "failing\n"


def test_network_policy_admits_only_the_selected_clients(real_node: RealNode) -> None:
    """kube-router enforces a NetworkPolicy that lets only pods labelled access=granted reach a server."""
    policy_ns = real_node.restricted_namespace(f"netpol-{uuid.uuid4().hex[:6]}")
    server = pod(
        "server", "mkdir /tmp/www && echo hi >/tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    )
    server["metadata"]["labels"] = {"app": "server"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "granted-only"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"access": "granted"}}}]}],
        },
    }
    clients = []
    for access in ("granted", "none"):
        client = pod(f"client-{access}", "exec sleep 3600", terminationGracePeriodSeconds=0)
        client["metadata"]["labels"] = {"access": access}
        clients.append(client)
    real_node.apply(policy_ns, server, service, policy, *clients)
    for name in ("server", "client-granted", "client-none"):
        real_node.kubectl(
            "-n", policy_ns, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=60s", timeout=90
        )

    def get(client: str) -> subprocess.CompletedProcess[str]:
        request = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 server 80 | tail -1"
        return real_node.kubectl("-n", policy_ns, "exec", client, "--", "sh", "-c", request, check=False)

    # Once the Service leads to the server (the labelled client gets through), the firewall follows the
    # policy within moments: the unlabelled client is refused, and the labelled one still gets through.
    real_node.wait_for(
        lambda: get("client-granted").stdout == "hi\n", "client-granted to reach the server", 30
    )
    real_node.wait_for(lambda: get("client-none").stdout == "", "the policy to refuse client-none", 30)
    assert get("client-granted").stdout == "hi\n"
    refused = get("client-none")
    assert refused.stdout == "" and "can't connect" in refused.stderr, refused


def test_helm_install_brings_a_deployment_ready(real_node: RealNode) -> None:
    release_ns = real_node.restricted_namespace(f"helm-{uuid.uuid4().hex[:6]}")
    chart = ROOT / "tests" / "charts" / "node-demo"
    real_node.helm("install", "demo", str(chart), "-n", release_ns, "--set", "message=installed", "--wait",
                   "--timeout", "90s")  # fmt: skip
    deployment = real_node.get("-n", release_ns, "deployment", "demo-web")
    assert deployment["status"].get("readyReplicas") == 1, deployment["status"]
    # This machine reaches the release's Service on its ClusterIP (kube-proxy's DNAT on the host).
    cluster_ip = real_node.get("-n", release_ns, "service", "demo-web")["spec"]["clusterIP"]
    reply = http().get(f"http://{cluster_ip}/index.html")
    assert reply.text.startswith("installed from demo-web-"), reply.text
    real_node.helm("uninstall", "demo", "-n", release_ns, "--wait", "--timeout", "60s")
    assert real_node.get("-n", release_ns, "deployments")["items"] == []


@contextlib.contextmanager
def port_forward(node: RealNode, ns: str, target: str, port: int) -> Iterator[int]:
    """``kubectl port-forward`` to ``target``'s ``port`` on a free local port; yields the local port."""
    argv = [
        str(node.bin_dir / "kubectl"),
        "-n",
        ns,
        "port-forward",
        target,
        f":{port}",
        "--address=127.0.0.1",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node.env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080", or EOF if it failed
        match = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
        if match is None:
            proc.kill()
            raise AssertionError(f"kubectl port-forward: {line}{proc.communicate()[1]}")
        yield int(match.group(1))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
