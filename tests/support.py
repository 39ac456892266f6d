"""Helpers the tests share (constants, waits, the live server's handles, fake adapters, the kwok
cluster's client). conftest.py holds only fixtures and hooks."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from kube_client import KubeClient

from loraplane.common.settings import Settings
from loraplane.platform.quickstart import BASE_NAME
from loraplane.serving.launcher import VLLMServer

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
