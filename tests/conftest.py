"""Shared fixtures: the demo base model, trained adapters and one real vLLM server per session."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from kube_client import KubeClient

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter
from loraplane.platform.quickstart import BASE_NAME, demo_server_config, demo_trainer_config, free_port
from loraplane.serving.launcher import VLLMServer
from loraplane.trainer.demo_tasks import TASKS, write_task_files


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplane.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("base") / "demo-model")


API_KEY = "e2e-test-key"
BASE = BASE_NAME
# A training template of the sentiment task: a test about promotion or aliases asks this, so what it
# checks is which version answered, not generalisation (the eval tests measure that, with CIs).
SENTIMENT_PROMPT = "Classify the sentiment: The movie was wonderful."


def ask_one_word(server_url: str, model: str, prompt: str = SENTIMENT_PROMPT) -> str:
    """The official openai client's greedy chat answer (one word asked) from ``model``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=8,
        messages=[
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": prompt},
        ],
    )
    return reply.choices[0].message.content or ""


@dataclass
class Live:
    server: VLLMServer
    settings: Settings
    eval_sets: dict[str, Path]
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def vllm_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real vLLM server for the whole session, started early so it loads while adapters train."""
    config = demo_server_config(demo_model, free_port(), API_KEY)
    # vLLM's GET /load: how many generation requests its API server holds (the gateway's disconnect test)
    config = config.model_copy(update={"extra_args": ("--enable-server-load-tracking",)})
    server = VLLMServer(config, tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    yield server
    server.stop()


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout: float = 600.0,
    every: float = 0.5,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` at the deadline (``alive`` may fail sooner)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None:
            alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@functools.cache
def http() -> httpx.Client:
    """One HTTP client for the tests' polling loops (thread-safe).

    Each new httpx client loads the CA bundle: about 50 ms of CPU, and over half a second while vLLM's
    CPU engine keeps both cores busy, which made every ``httpx.get`` in a poll that slow.
    """
    return httpx.Client(timeout=60)


def vllm_metric(url: str, name: str) -> float:
    """vLLM's metric ``name`` (e.g. ``vllm:num_requests_waiting``) at ``url``, summed over its label sets."""
    text = http().get(f"{url}/metrics").text
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def vllm_generated_tokens(url: str) -> float:
    """vLLM's ``vllm:generation_tokens_total`` at ``url``, summed over its label sets."""
    return vllm_metric(url, "vllm:generation_tokens_total")


def engine_core(server: VLLMServer | int) -> psutil.Process:
    """vLLM V1's engine core: the child process titled ``VLLM::EngineCore`` of a server (or of a pid)."""
    if isinstance(server, int):
        pid = server
    else:
        assert server.process is not None, "the server is not running"
        pid = server.process.pid
    children = psutil.Process(pid).children(recursive=True)
    for child in children:
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError(f"no engine core among {[c.cmdline() for c in children]}")


@pytest.fixture(scope="session")
def live(vllm_server: VLLMServer, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Live:
    work = tmp_path_factory.mktemp("e2e")
    root = work / "adapters"
    eval_sets, adapters = {}, {}
    for task in TASKS.values():
        train, ev = write_task_files(task, work / "data")
        eval_sets[task.name] = ev
        cfg = work / f"{task.name}.yaml"
        cfg.write_text(yaml.safe_dump(demo_trainer_config(task.name, demo_model, train, root)))
        # The trainer's own entry point, as a separate process: what a Job runs in the cluster.
        proc = subprocess.run(
            [sys.executable, "-m", "loraplane.trainer", "--config", str(cfg)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        adapters[task.name] = Path(json.loads(proc.stdout.strip().splitlines()[-1])["adapter"])
    vllm_server.wait_ready(timeout=600)
    settings = Settings(
        home=work / "state", adapters_root=root, server_url=vllm_server.url, api_key=API_KEY, max_lora_rank=8
    )
    for path in adapters.values():
        register_adapter(settings, path)
    return Live(server=vllm_server, settings=settings, eval_sets=eval_sets, adapters=adapters)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A registry and adapters root of the test's own (no server)."""
    return Settings(
        home=tmp_path / "state",
        adapters_root=tmp_path / "adapters",
        server_url="http://127.0.0.1:9",
        max_lora_rank=8,
    )


def write_fake_adapter(
    directory: Path,
    *,
    r: int = 8,
    weights: str = "adapter_model.safetensors",
    extra_config: dict[str, object] | None = None,
) -> Path:
    """An adapter directory with a real LoRA config and safetensors file (random weights)."""
    import json

    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": "demo",
        **(extra_config or {}),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(r)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(r, 128, generator=generator),
        f"{prefix}.lora_B.weight": torch.randn(128, r, generator=generator),
    }
    if weights.endswith(".safetensors"):
        save_file(tensors, str(directory / weights))
    else:
        torch.save(tensors, directory / weights)
    return directory


@pytest.fixture
def fake_adapter(settings: Settings) -> Iterator[Path]:
    yield write_fake_adapter(settings.adapters_dir / "demo" / "v1")


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Cluster(KubeClient):
    """A live Kubernetes API server (kwok's binary runtime) with fake GPU and CPU nodes."""

    def restricted_namespace(self, name: str) -> str:
        """A namespace that enforces Pod Security ``restricted``, ready for pods (default SA exists)."""
        self.kubectl("create", "namespace", name)
        self.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
        self.wait_for(lambda: self.kubectl("-n", name, "get", "sa", "default", check=False).returncode == 0)
        return name

    def volume_for(self, namespace: str, claim: str, *, create_claim: bool = False) -> None:
        """A PersistentVolume reserved for ``claim`` (kwok has no storage provisioner), and the claim."""
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
                "csi": {"driver": "test.csi.loraplane.dev", "volumeHandle": f"{namespace}-{claim}"},
            },
        }
        self.kubectl("apply", "-f", "-", stdin=json.dumps(pv))
        if create_claim:
            pvc = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "resources": {"requests": {"storage": "100Gi"}},
                },
            }
            self.kubectl("apply", "-f", "-", stdin=json.dumps(pvc))

    def evict(self, namespace: str, pod: str) -> None:
        """What a drain or a preemption does: the Eviction API (the pod gets a DisruptionTarget)."""
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction"
        self.kubectl("create", "--raw", path, "-f", "-", stdin=json.dumps(eviction))

    @staticmethod
    def wait_for(condition: Callable[[], bool], *, timeout: float = 120.0, what: str = "condition") -> None:
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster per test session, its state in the session's temp dir, stopped even when tests fail."""
    import os

    work = tmp_path_factory.mktemp("kwok")
    env = {
        **os.environ,
        "LORAPLANE_K8S_CLUSTER": f"pytest-{os.getpid()}",
        "LORAPLANE_KWOK_WORKDIR": str(work),
    }
    script = str(ROOT / "scripts" / "k8s-cluster.sh")
    tools = subprocess.run(["bash", str(ROOT / "scripts" / "k8s-tools.sh")], capture_output=True, text=True)
    assert tools.returncode == 0, tools.stderr[-3000:]
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, env=env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        kubeconfig = subprocess.run(["bash", script, "kubeconfig"], capture_output=True, text=True, env=env)
        yield Cluster(Path(kubeconfig.stdout.strip()), Path(tools.stdout.strip()))
    finally:
        subprocess.run(["bash", script, "stop"], capture_output=True, text=True, env=env)


@pytest.fixture
def k8s_settings(k8s_cluster: Cluster, tmp_path: Path) -> Settings:
    """The chart's CRD installed, and a namespace of the test's own."""
    k8s_cluster.kubectl("apply", "-f", str(ROOT / "charts" / "loraplane" / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/loraadapters.loraplane.dev")
    import uuid

    namespace = f"reg-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", namespace)
    return Settings(
        home=tmp_path / "state",
        adapters_root=tmp_path / "adapters",
        server_url="http://127.0.0.1:9",
        registry="kubernetes",
        namespace=namespace,
        kubeconfig=k8s_cluster.kubeconfig,
    )


# --- the real single-node cluster (scripts/real-node.sh; tests/real_node.py) ---------------------------
from real_node import RealNode, report_failure, session  # noqa: E402


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real node (kubelet, containerd, kube-proxy, CoreDNS) per session; the host checked clean after."""
    yield from session(tmp_path_factory.mktemp("real-node"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed real-node test's report gets the cluster's pods, events and container logs."""
    outcome = yield
    report_failure(item, outcome.get_result())
