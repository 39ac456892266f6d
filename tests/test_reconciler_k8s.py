"""Each vLLM pod's reconciler against the real API server (kwok) and the session's real vLLM server.

Two reconcilers (``python -m loraplane.serving.replica_reconciler``, what runs inside every chart vLLM
pod) stand for two replicas: kwok runs the two labelled pods' objects (Ready), the reconcilers run
here under those pods' names. Both serve the session's one vLLM server, so "both replicas" means both
reconcilers converged and reported; the real node's walk (tests/test_cluster_walk.py) does the same
with two real vLLM pods. ``--keep-unknown``: the shared server's other adapters are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import API_KEY, BASE, Cluster, Live, http

from loraplane.common.files import sha256_file
from loraplane.common.settings import Settings
from loraplane.platform.adapters import load_adapter, register_adapter, unload_adapter
from loraplane.platform.convergence import ReplicasDidNotConvergeError
from loraplane.registry.backends import open_registry
from loraplane.registry.model import HistoryEvent
from loraplane.serving import readiness
from loraplane.serving.server_state import read_state

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

PODS = ("replica-a", "replica-b")


@dataclass
class Watched:
    settings: Settings
    states: dict[str, Path]
    procs: dict[str, subprocess.Popen[str]]
    cluster: Cluster

    def reports(self, name: str) -> dict[str, Any]:
        listed = self.cluster.kubectl(
            "-n", self.settings.namespace, "get", "loraadapters", name, "-o", "json", check=False
        )
        if listed.returncode != 0:
            return {}
        servers: dict[str, Any] = json.loads(listed.stdout).get("status", {}).get("servers", {})
        return servers

    def served(self) -> set[str]:
        answer = http().get(
            f"{self.settings.server_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        return {m["id"] for m in answer.json()["data"]}

    def alive(self) -> None:
        for pod, proc in self.procs.items():
            assert proc.poll() is None, f"the reconciler of {pod} exited: {proc.communicate()[1][-3000:]}"


def _pod(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/component": "vllm", "loraplane.dev/reconciler": "watch"},
        },
        "spec": {
            "containers": [{"name": "vllm", "image": "localhost/loraplane/loraplane-cpu:test"}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


@pytest.fixture
def watched(
    k8s_cluster: Cluster, k8s_settings: Settings, live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Watched]:
    settings = k8s_settings.model_copy(
        update={
            "adapters_root": live.settings.adapters_dir,
            "server_url": live.server.url,
            "api_key": API_KEY,
            "max_lora_rank": 8,
        }
    )
    ns = settings.namespace
    manifest = tmp_path / "pods.json"
    manifest.write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": [_pod(p, ns) for p in PODS]})
    )
    k8s_cluster.kubectl("apply", "-f", str(manifest))
    k8s_cluster.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod", *PODS, "--timeout=120s")
    key = tmp_path / "vllm-key"
    key.write_text(API_KEY)
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)  # for the readiness probe, run in this process
    states = {pod: tmp_path / f"{pod}.json" for pod in PODS}
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "VLLM_API_KEY")}
    procs = {
        pod: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraplane.serving.replica_reconciler",
                "--url",
                live.server.url,
                "--pod",
                pod,
                "--namespace",
                ns,
                "--kubeconfig",
                str(k8s_cluster.kubeconfig),
                "--api-key-file",
                str(key),
                "--adapters-root",
                str(live.settings.adapters_dir),
                "--max-lora-rank",
                "8",
                "--max-cpu-loras",  # the session server's (conftest): it holds every test's adapters
                "256",
                "--state-file",
                str(states[pod]),
                "--keep-unknown",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pod in PODS
    }
    w = Watched(settings=settings, states=states, procs=procs, cluster=k8s_cluster)
    try:
        k8s_cluster.wait_for(
            lambda: (w.alive(), all((s := read_state(p)) and s.phase == "ready" for p in states.values()))[1],
            timeout=60,
            what="both reconcilers' first pass",
        )
        yield w
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


def _adapter_name(prefix: str, tmp_path: Path) -> str:
    return f"{prefix}-" + tmp_path.name.lower().replace("_", "-")[-12:].strip("-")


def _copy(live: Live, name: str, version: str) -> Path:
    source = live.adapters[sorted(live.adapters)[0]]
    target = live.settings.adapters_dir / name / version
    shutil.copytree(source, target)
    return target


def _ready(w: Watched, pod: str, *extra: str) -> tuple[int, str]:
    """The readiness probe as the chart runs it (its main, here), from the pod's state file."""
    state = ["--state-file", str(w.states[pod])]
    argv = ["--url", w.settings.server_url, "--base-model", BASE, *state, *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = readiness.main(argv)
    return code, (out.getvalue() + err.getvalue()).strip()


def test_a_publication_reaches_both_replicas_through_the_watch_and_never_changes_readiness(
    watched: Watched, live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, settings = watched, watched.settings
    name = _adapter_name("watched", tmp_path)
    published = time.monotonic()
    entry = register_adapter(settings, _copy(live, name, "v1"), name=name, version="v1")
    w.cluster.wait_for(
        lambda: all(w.reports(name).get(p, {}).get("loaded") == ["v1"] for p in PODS),
        timeout=30,
        what="both replicas to report v1 loaded",
    )
    took = time.monotonic() - published
    assert entry.served_name in w.served()
    # A registration is served, but not required: it never changes readiness.
    for pod in PODS:
        state = read_state(w.states[pod])
        assert state is not None and entry.served_name in state.loaded
        assert state.required is not None and entry.served_name not in state.required
        assert _ready(w, pod) == (0, "ready")
    # The probe reads only the pod's state file: an API server it cannot reach changes nothing.
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: dead\n"
        "clusters: [{name: dead, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: dead, user: {}}]\ncontexts: [{name: dead, context: {cluster: dead, user: dead}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(dead))
    registry_args = ("--registry", "kubernetes", "--namespace", settings.namespace)
    assert _ready(w, PODS[0], *registry_args) == (0, "ready")
    monkeypatch.delenv("KUBECONFIG")

    # `adapters load` writes the wanted state and waits for the replicas' reports: no server URL asked.
    nowhere = settings.model_copy(update={"server_url": "http://127.0.0.1:9"})
    loaded = asyncio.run(load_adapter(nowhere, entry.ref))
    assert loaded.state == "serving"
    for pod in PODS:  # the reconciler saw the load before it reported it: it requires it now
        state = read_state(w.states[pod])
        assert state is not None and state.required is not None and entry.served_name in state.required
        assert _ready(w, pod) == (0, "ready")

    # Unloading goes the same way: the registry first, then every replica drops it.
    asyncio.run(unload_adapter(nowhere, entry.ref))
    assert entry.served_name not in w.served()
    assert all(w.reports(name).get(p, {}).get("loaded") == [] for p in PODS)
    print(f"publish -> both replicas report it: {took:.2f} s")  # noqa: T201 (shown with -rA)


def test_a_corrupt_version_fails_alone_and_is_reported_with_its_reason(
    watched: Watched, live: Live, tmp_path: Path
) -> None:
    w, settings = watched, watched.settings
    name = _adapter_name("corrupt", tmp_path)
    good = register_adapter(settings, _copy(live, name, "v1"), name=name, version="v1")
    asyncio.run(load_adapter(settings, good.ref))
    # v2's weights file is cut short, and recorded with the sha256 of those very bytes (as a tool
    # that did not read the file through would record it): only reading it completely shows the damage.
    bad_dir = _copy(live, name, "v2")
    weights = bad_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    bad = good.model_copy(
        update={
            "version": "v2",
            "served_name": f"{name}@v2",
            "path": str(bad_dir),
            "weights_sha256": sha256_file(weights),
            "state": "registered",
            "evals": [],
        }
    )
    with open_registry(settings).transaction() as state:
        state.adapter(name).versions["v2"] = bad
        state.history.append(HistoryEvent(action="register", adapter=name, version="v2"))
    w.cluster.wait_for(
        lambda: all(
            [f["version"] for f in w.reports(name).get(p, {}).get("failed", [])] == ["v2"] for p in PODS
        ),
        timeout=30,
        what="both replicas to report v2 failed",
    )
    reasons = [w.reports(name)[p]["failed"][0]["reason"] for p in PODS]
    assert all("adapter_model.safetensors" in r for r in reasons), reasons
    served = w.served()
    assert good.served_name in served and bad.served_name not in served
    shown = open_registry(settings).read().resolve(bad.ref)
    assert shown.failure is not None and shown.failure.reason == reasons[0] and shown.failure.server in PODS
    for pod in PODS:
        assert _ready(w, pod) == (0, "ready"), "a failed version must not take a replica out"

    with pytest.raises(ReplicasDidNotConvergeError) as refused:
        asyncio.run(load_adapter(settings, bad.ref, timeout=30))
    assert all(p in refused.value.message for p in PODS), refused.value.message
    after = open_registry(settings).read()
    assert after.resolve(bad.ref).state == "registered", "the refused load was undone"
    assert [e.action for e in after.history if e.version == "v2"][-2:] == ["load", "load-failed"]
    for pod in PODS:
        assert _ready(w, pod) == (0, "ready")
    w.alive()
