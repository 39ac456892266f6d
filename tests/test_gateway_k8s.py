"""The gateway with its registry in Kubernetes: LoraAdapter objects, polled, alias flips picked up."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from support import API_KEY, Cluster, Live, write_fake_adapter

from loraplane.common.settings import Settings
from loraplane.platform.adapters import promote_adapter, register_adapter
from loraplane.platform.quickstart import free_port
from loraplane.registry.backends import open_registry
from loraplane.registry.model import move_alias
from loraplane.serving.gateway.registry_poll import PollingRegistryWatcher

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

KEY = "gateway-test-key"


def _register(settings: Settings, name: str, *versions: str) -> None:
    for v in versions:
        register_adapter(settings, write_fake_adapter(settings.adapters_dir / name / v), name=name, version=v)


def _point(settings: Settings, name: str, version: str) -> None:
    with open_registry(settings).transaction() as state:
        expected = state.adapter(name).aliases.get("prod")
        move_alias(state, name, "prod", version, expected=expected, action="promote")


def test_the_polling_watcher_follows_alias_flips_in_the_cluster(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    _register(k8s_settings, "demo", "v1", "v2")
    _point(k8s_settings, "demo", "v1")
    watcher = PollingRegistryWatcher(open_registry(k8s_settings), interval=0.2)
    watcher.start()
    try:
        assert watcher.state().resolve("demo").version == "v1"
        _point(k8s_settings, "demo", "v2")
        k8s_cluster.wait_for(
            lambda: watcher.state().resolve("demo").version == "v2", timeout=10, what="the flip to v2"
        )
        # An API server that cannot be reached keeps the last good state: requests go on being routed.
        dead = k8s_settings.home / "dead-kubeconfig"
        dead.parent.mkdir(parents=True, exist_ok=True)
        dead.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: dead\n"
            "clusters: [{name: dead, cluster: {server: 'http://127.0.0.1:9'}}]\n"
            "users: [{name: dead, user: {}}]\n"
            "contexts: [{name: dead, context: {cluster: dead, user: dead}}]\n"
        )
        watcher.registry = open_registry(k8s_settings.model_copy(update={"kubeconfig": dead}))
        refreshes = watcher.refreshes
        watcher.refresh()
        assert watcher.refreshes == refreshes, "the failed read did not replace the state"
        assert watcher.state().resolve("demo").version == "v2"
    finally:
        watcher.stop()


def test_the_gateway_serves_aliases_it_reads_from_loraadapter_objects(
    k8s_cluster: Cluster, k8s_settings: Settings, live: Live
) -> None:
    """The real vLLM server behind a gateway whose registry is in the cluster."""
    import asyncio
    import shutil

    settings = k8s_settings.model_copy(
        update={
            "adapters_root": live.settings.adapters_dir,
            "server_url": live.server.url,
            "api_key": API_KEY,
        }
    )
    name = f"k8s-{settings.namespace}"  # served names live on the shared server: unique per test
    port = free_port()
    argv = [
        sys.executable, "-m", "loraplane.serving.gateway", "--upstream", live.server.url,
        "--home", str(settings.home), "--registry", "kubernetes", "--namespace", settings.namespace,
        "--port", str(port),
    ]  # fmt: skip
    env = {**k8s_cluster.env(), "LORAPLANE_GATEWAY_API_KEYS": KEY, "LORAPLANE_API_KEY": API_KEY}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def ask(model: str) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
            timeout=60,
        )

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the gateway did not start"
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        refused = ask(name)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"

        copy = settings.adapters_dir / name / "v1"
        shutil.copytree(live.adapters["sentiment"], copy)
        register_adapter(settings, copy, name=name, version="v1")
        asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="k8s registry test"))
        # The registration and the alias are two writes: wait for the one the request needs.
        k8s_cluster.wait_for(
            lambda: ask(f"{name}:prod").status_code == 200, timeout=30, what="the gateway to see the alias"
        )
        answer = ask(f"{name}:prod")
        assert answer.status_code == 200 and answer.json()["model"] == f"{name}@v1", answer.text
        assert ask(f"{name}@v7").status_code == 404
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
