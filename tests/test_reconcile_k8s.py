"""Listing the vLLM replicas of a release: the Ready pods of the chart's vLLM Deployment, as pod-IP URLs.

The Deployment is built from the chart's own rendering (its selector, pod labels, container name and
port), trimmed to what kwok can run; kwok gives the pods IPs and makes them Ready.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_client import helm_args
from support import ROOT, Cluster

from loraplane.common.settings import Settings
from loraplane.serving.replicas import list_vllm_pods, vllm_selector

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "loraplane"


def _chart_vllm_deployment(release: str, *sets: str) -> dict[str, Any]:
    helm = str(ROOT / ".venv" / "bin" / "helm")
    extra = [arg for s in sets for arg in ("--set", s)]
    rendered = subprocess.run(
        [helm, *helm_args(("template", release, str(CHART), "--set", "serving.port=8123", *extra))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for doc in yaml.safe_load_all(rendered):
        if (
            doc
            and doc["kind"] == "Deployment"
            and doc["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "vllm"
        ):
            return dict(doc)
    raise AssertionError("the chart renders no vLLM Deployment")


def _deployment(chart: dict[str, Any], name: str, replicas: int, cpu: str = "10m") -> dict[str, Any]:
    template = chart["spec"]["template"]
    vllm = next(c for c in template["spec"]["containers"] if c["name"] == "vllm")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": chart["spec"]["selector"],
            "template": {
                "metadata": {"labels": template["metadata"]["labels"]},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm:test",
                            "command": vllm["command"],
                            "args": vllm["args"],
                            "ports": vllm["ports"],
                            "resources": {"requests": {"cpu": cpu}},
                        }
                    ]
                },
            },
        },
    }


def test_ready_vllm_pods_of_the_release_become_pod_ip_urls(k8s_cluster: Cluster) -> None:
    ns = f"replicas-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", ns)
    chart = _chart_vllm_deployment("platform")
    assert chart["spec"]["selector"]["matchLabels"] == dict(
        pair.split("=") for pair in vllm_selector("platform").split(",")
    ), "serving/replicas.py's selector must be the chart's"
    other = _chart_vllm_deployment("other")
    # two Ready replicas; one that can never be scheduled (not Ready); another release's pod
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(_deployment(chart, "vllm", 2)))
    pending = _deployment(chart, "vllm-pending", 1, cpu="1000")
    pending["spec"]["template"]["metadata"]["labels"] = {**pending["spec"]["template"]["metadata"]["labels"]}
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(pending))
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(_deployment(other, "vllm-other", 1)))
    settings = Settings(registry="kubernetes", namespace=ns, kubeconfig=k8s_cluster.kubeconfig)

    def ready_ips() -> list[str]:
        out = k8s_cluster.kubectl(
            "-n", ns, "get", "pods", "-l", vllm_selector("platform"), "-o", "json"
        ).stdout
        return sorted(
            p["status"]["podIP"]
            for p in json.loads(out)["items"]
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            and p["status"].get("podIP")
        )

    k8s_cluster.wait_for(lambda: len(ready_ips()) == 2, what="two Ready vLLM pods")
    urls = list_vllm_pods(settings, release="platform")
    assert sorted(urls) == sorted(f"http://{ip}:8123" for ip in ready_ips())
    assert len(urls) == 2  # not the pending pod, not the other release's
    assert list_vllm_pods(settings, release="missing") == []
    k8s_cluster.kubectl("-n", ns, "scale", "deployment/vllm", "--replicas=1")
    k8s_cluster.wait_for(lambda: len(list_vllm_pods(settings, release="platform")) == 1, what="scale down")
    k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_the_servers_rank_limit_is_read_from_the_release_pods(k8s_cluster: Cluster, tmp_path: Path) -> None:
    """register/load/sync check an adapter against the --max-lora-rank the release's vLLM pods run with
    (the chart's serving.maxLoraRank), not against a default."""
    from support import write_fake_adapter

    from loraplane.common.adapter_dir import AdapterPreflightError
    from loraplane.platform.adapters import register_adapter
    from loraplane.serving.limits import server_limits

    ns = f"limits-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", ns)
    settings = Settings(
        registry="kubernetes", namespace=ns, kubeconfig=k8s_cluster.kubeconfig, adapters_root=tmp_path
    )
    assert server_limits(settings) is None, "no pod yet: nothing to read, the settings' default applies"
    chart = _chart_vllm_deployment("platform", "serving.maxLoraRank=8", "serving.maxLoras=3")
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(_deployment(chart, "vllm", 1)))
    k8s_cluster.wait_for(lambda: server_limits(settings) is not None, what="the vLLM pod")
    limits = server_limits(settings)
    assert limits is not None and (limits.max_lora_rank, limits.max_loras) == (8, 3)
    wide = write_fake_adapter(tmp_path / "wide" / "v1", r=16)
    with pytest.raises(AdapterPreflightError, match="exceeds the server's max_lora_rank 8"):
        register_adapter(settings, wide, name="wide", version="v1")
    k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false")
