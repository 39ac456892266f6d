"""`loraplane install | upgrade | uninstall | status` against the kwok cluster's real API server, with
the real `helm` driven through pyhelm3; `install --gpu-operator` from a chart repository served on
loopback (a stand-in chart named gpu-operator, packaged and indexed by the real helm)."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Cluster

CHART = ROOT / "charts" / "loraplane"
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _cli(
    cluster: Cluster, ns: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "loraplane.platform.cli", "-n", ns, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, env={**cluster.env(), "COLUMNS": "200", **(env or {})}
    )


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _vllm_pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    listed = cluster.kubectl("-n", ns, "get", "pods", "-l", "app.kubernetes.io/component=vllm", "-o", "json")
    return [p for p in json.loads(listed.stdout)["items"] if "deletionTimestamp" not in p["metadata"]]


@pytest.mark.e2e
@pytest.mark.k8s
def test_install_status_upgrade_uninstall_drive_the_release(k8s_cluster: Cluster, tmp_path: Path) -> None:
    ns = k8s_cluster.restricted_namespace("cli-install")
    k8s_cluster.volume_for(ns, "platform-loraplane-data")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"serving": {"tolerations": TOLERATE_GPU, "maxLoras": 2}}))

    installed = _json(
        _cli(k8s_cluster, ns, "install", "-f", str(values), "--wait", "--timeout", "120s", "-o", "json")
    )
    assert installed["release"]["revision"] == 1 and installed["release"]["status"] == "deployed"
    assert installed["release"]["chart"].startswith("loraplane-")

    status = _json(_cli(k8s_cluster, ns, "status", "-o", "json"))
    assert status["release"]["revision"] == 1
    assert status["vllm"] == [{"deployment": "platform-loraplane-vllm", "desired": 1, "ready": 1}]
    assert status["aliases"] == {} and status["aliases_error"] is None
    (pod,) = _vllm_pods(k8s_cluster, ns)
    assert "--max-loras=2" in pod["spec"]["containers"][0]["args"]

    again = _cli(k8s_cluster, ns, "install")
    assert (
        again.returncode == 2 and "already installed in namespace 'cli-install' (revision 1" in again.stderr
    )

    # The chart's schema rejects a negative replica count: one line, exit 2, nothing changed.
    bad = _cli(k8s_cluster, ns, "upgrade", "-f", str(values), "--set", "serving.replicas=-1")
    assert bad.returncode == 2, bad.stderr
    assert "error: helm upgrade platform: UPGRADE FAILED: values don't meet the specifications" in bad.stderr
    assert "/replicas': minimum: got -1, want 0" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 2, "the message and its hint"
    assert _json(_cli(k8s_cluster, ns, "status", "-o", "json"))["release"]["revision"] == 1

    # --set wins over -f, later -f over earlier: maxLoras 8; three gateway replicas (no GPU: the session's
    # cluster has two GPUs that other tests' pods may hold).
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump({"serving": {"maxLoras": 4}}))
    upgraded = _cli(
        k8s_cluster, ns, "upgrade", "-f", str(values), "-f", str(more),
        "--set", "serving.maxLoras=8,gateway.replicas=3", "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr
    assert "upgraded platform" in upgraded.stdout and "revision 2, deployed" in upgraded.stdout

    def upgraded_pods() -> bool:
        pods = _vllm_pods(k8s_cluster, ns)
        return len(pods) == 1 and all(
            "--max-loras=8" in p["spec"]["containers"][0]["args"] and p["status"].get("phase") == "Running"
            for p in pods
        )

    k8s_cluster.wait_for(upgraded_pods, what="the vLLM pod with --max-loras=8")
    gateways = k8s_cluster.kubectl(
        "-n", ns, "get", "deploy", "-l", "app.kubernetes.io/component=gateway", "-o", "json"
    )
    assert [d["spec"]["replicas"] for d in json.loads(gateways.stdout)["items"]] == [3]
    shown = _cli(k8s_cluster, ns, "status")
    assert "revision 2, deployed" in shown.stdout and "1/1 ready" in shown.stdout

    gone = _cli(k8s_cluster, ns, "uninstall", "--wait")
    assert gone.returncode == 0, gone.stderr
    assert k8s_cluster.helm("list", "-n", ns, "-a", "-q").stdout.split() == []
    kept = k8s_cluster.kubectl("-n", ns, "get", "pvc", "-o", "name").stdout.split()
    assert kept == ["persistentvolumeclaim/platform-loraplane-data"], "the data volume is kept"
    assert _json(_cli(k8s_cluster, ns, "status", "-o", "json"))["release"] is None
    twice = _cli(k8s_cluster, ns, "uninstall")
    assert twice.returncode == 2 and "release 'platform' is not installed" in twice.stderr
    nothing = _cli(k8s_cluster, ns, "upgrade")
    assert nothing.returncode == 2 and "install it first" in nothing.stderr


def test_helm_missing_and_cluster_unreachable_are_one_clear_line(tmp_path: Path) -> None:
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "loraplane.platform.cli", "-n", "x"]
    import os

    missing = subprocess.run(
        [*base, "status"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "LORAPLANE_HELM": "/nope/helm"},
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: LORAPLANE_HELM=/nope/helm: no executable helm there")
    assert "Traceback" not in missing.stderr

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    down = subprocess.run(
        [*base, "--kubeconfig", str(kubeconfig), "install", "--set", "serving.enabled=false"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert down.returncode == 1
    assert down.stderr.startswith("error: helm install platform: Kubernetes cluster unreachable")
    assert "127.0.0.1:9" in down.stderr and "hint: check --kubeconfig/--context" in down.stderr
    assert "Traceback" not in down.stderr

    bad_set = subprocess.run([*base, "install", "--set", "serving.replicas"], capture_output=True, text=True)
    assert bad_set.returncode == 2 and "'serving.replicas' is not KEY=VALUE" in bad_set.stderr


@pytest.fixture
def chart_repo(tmp_path: Path, k8s_cluster: Cluster) -> Iterator[str]:
    """A Helm chart repository on 127.0.0.1 holding a stand-in `gpu-operator` chart (one ConfigMap)."""
    chart = tmp_path / "src" / "gpu-operator"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v2", "name": "gpu-operator", "version": "1.2.3", "appVersion": "test"})
    )
    (chart / "values.yaml").write_text("driver:\n  enabled: true\n")
    (chart / "templates" / "marker.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: gpu-operator-marker\n"
        "data:\n  driver: {{ .Values.driver.enabled | quote }}\n"
    )
    repo = tmp_path / "repo"
    repo.mkdir()
    k8s_cluster.helm("package", str(chart), "-d", str(repo))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(repo))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    k8s_cluster.helm("repo", "index", str(repo), "--url", url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
@pytest.mark.k8s
def test_install_with_gpu_operator_installs_the_operator_chart_first_in_a_privileged_namespace(
    k8s_cluster: Cluster, chart_repo: str
) -> None:
    ns = k8s_cluster.restricted_namespace("cli-gpu-op")
    operator_ns = "cli-gpu-operator"
    result = _cli(
        k8s_cluster, ns, "install", "--gpu-operator", "--gpu-operator-repo", chart_repo,
        "--gpu-operator-version", "1.2.3", "--gpu-operator-namespace", operator_ns,
        "--set", "serving.enabled=false", "-o", "json",
    )  # fmt: skip
    installed = _json(result)
    assert installed["gpu_operator"]["chart"] == "gpu-operator-1.2.3"
    assert installed["gpu_operator"]["namespace"] == operator_ns
    assert installed["gpu_operator"]["status"] == "deployed"
    assert installed["release"]["namespace"] == ns and installed["release"]["status"] == "deployed"

    labels = json.loads(k8s_cluster.kubectl("get", "namespace", operator_ns, "-o", "json").stdout)[
        "metadata"
    ]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "privileged"
    marker = json.loads(
        k8s_cluster.kubectl("-n", operator_ns, "get", "configmap", "gpu-operator-marker", "-o", "json").stdout
    )
    assert marker["data"] == {"driver": "true"}, "the chart from the repository was installed"

    # An unknown version is one line naming it.
    missing = _cli(
        k8s_cluster, ns, "install", "--gpu-operator", "--gpu-operator-repo", chart_repo,
        "--gpu-operator-version", "9.9.9", "--gpu-operator-namespace", operator_ns,
    )  # fmt: skip
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert 'chart "gpu-operator" version "9.9.9" not found' in missing.stderr
    k8s_cluster.helm("uninstall", "gpu-operator", "-n", operator_ns)
    k8s_cluster.helm("uninstall", "platform", "-n", ns)
