"""Reaching the cluster's gateway and vLLM from this machine: a port-forward through the real API
server of the kwok cluster. kwok runs no containers; its PortForward resource routes a fake pod's
port to a local address: a local HTTP server, or the session's real vLLM server."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import API_KEY, BASE, ROOT, Cluster, Live

from loraplane.common.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.fixture(scope="module")
def platform_ns(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chart installed with the CLI (vLLM and the gateway on), and the registry CRD."""
    k8s_cluster.kubectl("apply", "-f", str(ROOT / "charts" / "loraplane" / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/loraadapters.loraplane.dev")
    ns = k8s_cluster.restricted_namespace("cli-pf")
    k8s_cluster.volume_for(ns, "platform-loraplane-data")
    values = tmp_path_factory.mktemp("pf") / "values.yaml"
    # vLLM's key in a Secret of our own: the session's vLLM server (behind the fake pod) uses API_KEY.
    k8s_cluster.kubectl(
        "-n", ns, "create", "secret", "generic", "vllm-key", f"--from-literal=api-key={API_KEY}"
    )
    # rehydrate off: these vLLM pods do not watch the registry (kwok runs no reconciler), so the CLI
    # reaches them the direct way, one port-forward per Ready pod. tests/test_reconciler_k8s.py covers
    # pods that watch it.
    serving = {
        "tolerations": TOLERATE_GPU,
        "apiKeySecret": {"name": "vllm-key", "key": "api-key"},
        "rehydrate": False,
        # The session's vLLM server behind these pods holds every test's adapters (conftest): the
        # chart's args are how the CLI knows a server's cache, so they must describe that server.
        "maxCpuLoras": 256,
    }
    # One gateway pod (the chart's default is 2): the tests below name the pod a port-forward reaches.
    values.write_text(yaml.safe_dump({"serving": serving, "gateway": {"replicas": 1}}))
    installed = _cli(k8s_cluster, ns, "install", "-f", str(values), "--wait", "--timeout", "120s")
    assert installed.returncode == 0, installed.stderr
    yield ns
    _cli(k8s_cluster, ns, "uninstall", "--wait")  # frees the fake GPU for other tests


def _cli(cluster: Cluster, ns: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in cluster.env().items() if k != "LORAPLANE_SERVER_URL"}
    argv = [sys.executable, "-m", "loraplane.platform.cli", "-n", ns, *args]
    return subprocess.run(argv, capture_output=True, text=True, env={**environ, "COLUMNS": "200", **env})


def _pod(cluster: Cluster, ns: str, component: str) -> str:
    listed = cluster.kubectl(
        "-n", ns, "get", "pods", "-l", f"app.kubernetes.io/component={component}", "-o", "json"
    )
    (pod,) = [p for p in json.loads(listed.stdout)["items"] if "deletionTimestamp" not in p["metadata"]]
    name: str = pod["metadata"]["name"]
    return name


def _forward(cluster: Cluster, ns: str, pod: str, port: int) -> None:
    """kwok's PortForward: every port of ``pod`` goes to 127.0.0.1:``port`` on this machine."""
    body = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "PortForward",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {"forwards": [{"target": {"address": "127.0.0.1", "port": port}}]},
    }
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(body))


@pytest.fixture
def local_site(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "hello.txt").write_text("hello through the API server\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _settings(cluster: Cluster, ns: str, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, registry="kubernetes", namespace=ns, kubeconfig=cluster.kubeconfig)


def test_a_port_forward_reaches_the_gateway_pod_and_ends_with_the_block(
    k8s_cluster: Cluster, platform_ns: str, local_site: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplane.platform.portforward import api_key_of, find_target, service_url

    monkeypatch.setenv("PATH", k8s_cluster.env()["PATH"])  # kubectl
    settings = _settings(k8s_cluster, platform_ns, tmp_path)
    assert api_key_of(settings, _pod(k8s_cluster, platform_ns, "vllm")) == API_KEY, "from the pod's Secret"
    target = find_target(settings, "gateway")
    assert (
        target.pod == _pod(k8s_cluster, platform_ns, "gateway")
        and target.service == "platform-loraplane-gateway"
    )
    _forward(k8s_cluster, platform_ns, target.pod, local_site)
    with service_url(settings, "gateway") as url:
        assert url.startswith("http://127.0.0.1:")
        for _ in range(3):  # one kubectl, many connections
            assert httpx.get(f"{url}/hello.txt").text == "hello through the API server\n"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/hello.txt")


def test_no_service_or_no_ready_pod_is_a_clear_error(
    k8s_cluster: Cluster, platform_ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplane.platform.portforward import PortForwardError, find_target

    monkeypatch.setenv("PATH", k8s_cluster.env()["PATH"])
    empty = k8s_cluster.restricted_namespace("cli-pf-empty")
    with pytest.raises(PortForwardError, match="no vllm Service in namespace 'cli-pf-empty'") as caught:
        find_target(_settings(k8s_cluster, empty, tmp_path), "vllm")
    assert "--server-url" in str(caught.value)

    # A Service whose selector matches no pod.
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "lonely", "namespace": empty, "labels": {"app.kubernetes.io/component": "vllm"}},
        "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 8000}]},
    }
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(service))
    with pytest.raises(PortForwardError, match="no Ready pod behind Service lonely"):
        find_target(_settings(k8s_cluster, empty, tmp_path), "vllm")
    cli = _cli(k8s_cluster, empty, "--registry", "kubernetes", "adapters", "load", "x@v1")
    assert cli.returncode == 1 and "no Ready pod behind Service lonely" in cli.stderr
    assert "Traceback" not in cli.stderr
    suite = tmp_path / "suite.yaml"
    (tmp_path / "e.jsonl").write_text('{"prompt": "2+2?", "reference": "4"}\n')
    suite.write_text("name: s\ndatasets:\n  - {name: math, path: e.jsonl, metrics: [exact_match]}\n")
    users = _cli(k8s_cluster, empty, "--registry", "kubernetes", "evals", "run", str(suite), "-m", "x")
    assert users.returncode == 1 and "no gateway Service in namespace 'cli-pf-empty'" in users.stderr


def test_admin_commands_and_status_reach_the_real_vllm_through_the_port_forward(
    k8s_cluster: Cluster, platform_ns: str, live: Live
) -> None:
    """No --server-url, no key: `adapters load`, `adapters promote` and `status` find the vLLM Service,
    read the key its pod uses from the Secret, forward to the pod (kwok routes it to the session's real
    vLLM server) and act on the real server."""
    ns = platform_ns
    _forward(k8s_cluster, ns, _pod(k8s_cluster, ns, "vllm"), int(live.server.url.rsplit(":", 1)[1]))
    env = {
        "LORAPLANE_REGISTRY": "kubernetes",
        "LORAPLANE_ADAPTERS_ROOT": str(live.settings.adapters_dir),
        "LORAPLANE_HOME": str(live.settings.home.parent / "pf-state"),
    }
    assert "LORAPLANE_SERVER_URL" not in os.environ and "LORAPLANE_API_KEY" not in os.environ
    task = sorted(live.adapters)[0]
    registered = _cli(k8s_cluster, ns, "adapters", "register", str(live.adapters[task]), **env)
    assert registered.returncode == 0, registered.stderr
    ref = registered.stdout.split()[1]  # "registered NAME@VERSION (PATH)"

    loaded = _cli(k8s_cluster, ns, "adapters", "load", ref, **env)
    assert loaded.returncode == 0, loaded.stderr
    assert f"{ref} is served by http://127.0.0.1:" in loaded.stdout

    promoted = _cli(
        k8s_cluster, ns, "adapters", "promote", ref, "--force", "--reason", "port-forward test", **env
    )
    assert promoted.returncode == 0, promoted.stderr

    status: dict[str, Any] = json.loads(_cli(k8s_cluster, ns, "status", "-o", "json", **env).stdout)
    assert status["loaded_error"] is None, status
    assert ref in status["loaded_adapters"] and BASE in status["base_models"]
    assert status["aliases"] == {task: {"prod": ref.split("@")[1]}}
    assert status["vllm"][0]["ready"] == 1 and status["release"]["status"] == "deployed"
    # A user's command: `evals run` without --endpoint goes to the gateway Service's pod (kwok routes
    # it to the same real vLLM server, which speaks the same OpenAI API as the gateway).
    _forward(k8s_cluster, ns, _pod(k8s_cluster, ns, "gateway"), int(live.server.url.rsplit(":", 1)[1]))
    suite = live.settings.home.parent / "pf-suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "pf",
                "datasets": [{"name": task, "path": str(live.eval_sets[task]), "metrics": ["exact_match"]}],
            }
        )
    )
    evaluated = _cli(
        k8s_cluster, ns, "evals", "run", str(suite), "-m", ref, "--base", BASE, "-o", "json",
        "--report-dir", str(live.settings.home.parent / "pf-reports"), LORAPLANE_API_KEY=API_KEY, **env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["models"] == {"candidate": ref, "base": BASE}
    assert report["endpoint"].startswith("http://127.0.0.1:") and report["endpoint"].endswith("/v1")

    table = _cli(k8s_cluster, ns, "status", **env)
    assert "loaded adapters: " in table.stdout and ref in table.stdout and "prod" in table.stdout


def _ready_vllm_pods(cluster: Cluster, ns: str) -> list[str]:
    listed = cluster.kubectl("-n", ns, "get", "pods", "-l", "app.kubernetes.io/component=vllm", "-o", "json")
    return sorted(
        p["metadata"]["name"]
        for p in json.loads(listed.stdout)["items"]
        if "deletionTimestamp" not in p["metadata"]
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    )


def _served(live: Live) -> set[str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return {m["id"] for m in httpx.get(f"{live.server.url}/v1/models", headers=headers).json()["data"]}


def test_a_promotion_from_outside_reaches_every_ready_vllm_pod_or_changes_nothing(
    k8s_cluster: Cluster, platform_ns: str, live: Live, tmp_path: Path
) -> None:
    """Two vLLM replicas, no --server-url: a promotion port-forwards to each Ready pod. While one pod's
    port leads nowhere the promotion fails and changes nothing (no alias, nothing left loaded on the
    replica that did load it); once both answer, it loads on both and moves the alias, and ``adapters
    sync`` reaches both the same way."""
    ns = platform_ns
    k8s_cluster.kubectl("-n", ns, "scale", "deployment", "platform-loraplane-vllm", "--replicas=2")
    try:
        k8s_cluster.wait_for(lambda: len(_ready_vllm_pods(k8s_cluster, ns)) == 2, what="two Ready vLLM pods")
        first, second = _ready_vllm_pods(k8s_cluster, ns)
        vllm_port = int(live.server.url.rsplit(":", 1)[1])
        _forward(k8s_cluster, ns, first, vllm_port)
        with socket.socket() as closed:  # bound, never listening: the second replica does not answer
            closed.bind(("127.0.0.1", 0))
            _forward(k8s_cluster, ns, second, closed.getsockname()[1])
            env = {
                "LORAPLANE_REGISTRY": "kubernetes",
                "LORAPLANE_ADAPTERS_ROOT": str(live.settings.adapters_dir),
                "LORAPLANE_HOME": str(tmp_path / "state"),
            }
            name = "pf-" + tmp_path.name.lower().replace("_", "-")[-20:].strip("-")
            copy = live.settings.adapters_dir / name / "v1"
            shutil.copytree(live.adapters[sorted(live.adapters)[0]], copy)
            registered = _cli(k8s_cluster, ns, "adapters", "register", str(copy), "--name", name, **env)
            assert registered.returncode == 0, registered.stderr
            ref = f"{name}@v1"

            refused = _cli(
                k8s_cluster, ns, "adapters", "promote", ref, "--force", "--reason", "two pods", **env
            )
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            assert "http://127.0.0.1:" in refused.stderr, refused.stderr  # the replica that failed
            assert ref not in _served(live), "the replica that loaded it unloaded it again"
            shown = json.loads(_cli(k8s_cluster, ns, "adapters", "show", name, "-o", "json", **env).stdout)
            assert shown["adapter"]["aliases"] == {}
            assert [e["action"] for e in shown["history"]] == ["register"]

        _forward(k8s_cluster, ns, second, vllm_port)
        loaded = _cli(k8s_cluster, ns, "adapters", "load", ref, **env)
        assert loaded.returncode == 0, loaded.stderr
        urls = loaded.stdout.split(" is served by ")[1].strip().split(", ")
        assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls), loaded.stdout
        promoted = _cli(k8s_cluster, ns, "adapters", "promote", ref, "--force", "--reason", "two pods", **env)
        assert promoted.returncode == 0, promoted.stderr
        assert ref in _served(live)
        shown = json.loads(_cli(k8s_cluster, ns, "adapters", "show", name, "-o", "json", **env).stdout)
        assert shown["adapter"]["aliases"] == {"prod": "v1"}
        # sync from outside the cluster: one port-forward per pod, too (a dry run: the vLLM is shared)
        synced = _cli(k8s_cluster, ns, "adapters", "sync", "--dry-run", "--keep-unknown", "-o", "json", **env)
        assert synced.returncode == 0, synced.stderr
        replicas = json.loads(synced.stdout)["replicas"]
        assert len({r["url"] for r in replicas}) == 2 and all(
            r["url"].startswith("http://127.0.0.1:") for r in replicas
        )
        assert all(ref in r["unchanged"] for r in replicas), replicas
    finally:
        k8s_cluster.kubectl("-n", ns, "scale", "deployment", "platform-loraplane-vllm", "--replicas=1")
        k8s_cluster.wait_for(lambda: len(_ready_vllm_pods(k8s_cluster, ns)) == 1, what="one vLLM pod again")
