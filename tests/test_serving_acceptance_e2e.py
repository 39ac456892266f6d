"""Serving acceptance against the session's real vLLM CPU server, with adapters the trainer made.

- four adapters loaded while a client stream runs: no request fails;
- invalid adapters (27 kinds) are refused with a clear error before vLLM is asked, while good
  traffic continues without an error; what vLLM itself answers to the ones it can judge maps to
  typed errors, and concurrent or repeated loads and unloads are idempotent;
- a promotion that cannot reach every replica changes nothing;
- readiness against the Kubernetes registry.

Also part of the acceptance, elsewhere: kill and restart (tests/test_rehydrate_e2e.py, with the
hung-engine check), flipping an alias under load through the gateway
(tests/test_gateway_e2e.py::test_alias_flip_under_load_fails_no_request_and_switches_within_a_second).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import API_KEY, BASE, Cluster, Live, write_fake_adapter

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.platform.adapters import load_adapter, promote_adapter, register_adapter, sync_adapters
from loraplane.serving import client as client_module
from loraplane.serving.client import (
    AdapterBadRequestError,
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterRejectedError,
    ServerUnavailableError,
    VLLMAdminClient,
)

pytestmark = pytest.mark.e2e

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
DEADLINE_S = 300.0


def _served(url: str) -> dict[str, str | None]:
    data = httpx.get(f"{url}/v1/models", headers=HEADERS, timeout=30).json()["data"]
    return {m["id"]: m.get("root") for m in data}


@pytest.fixture
def own(live: Live, tmp_path: Path) -> Settings:
    """A registry of the test's own; the session's adapters root (inside it, test-unique names)."""
    return live.settings.model_copy(update={"home": tmp_path / "state"})


def _prefix(tmp_path: Path) -> str:
    return re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-20:].strip("-")


def _copy_and_register(settings: Settings, live: Live, name: str, task: str) -> str:
    copy = settings.adapters_dir / name / "v1"
    shutil.copytree(live.adapters[task], copy)
    register_adapter(settings, copy, name=name, version="v1")
    return f"{name}@v1"


@dataclass
class Traffic:
    """Client threads sending short completions to ``models`` in turn, until stopped."""

    url: str
    models: list[str]
    ok: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _worker(self, offset: int) -> None:
        n = offset
        with httpx.Client(headers=HEADERS, timeout=120) as http:
            while not self._stop.is_set():
                with self._lock:
                    model = self.models[n % len(self.models)]
                n += 1
                try:
                    reply = http.post(
                        f"{self.url}/v1/completions",
                        json={"model": model, "prompt": "The movie was", "max_tokens": 4, "temperature": 0},
                    )
                    good = reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None
                    problem = None if good else f"{model}: HTTP {reply.status_code} {reply.text[:200]}"
                except Exception as exc:  # every failure is a finding: recorded, then asserted on
                    problem = f"{model}: {type(exc).__name__}: {exc}"
                with self._lock:
                    if problem:
                        self.failures.append(problem)
                    else:
                        self.ok[model] = self.ok.get(model, 0) + 1

    def add(self, *models: str) -> None:
        with self._lock:
            self.models.extend(models)

    def wait_for(self, condition: Callable[[dict[str, int]], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with self._lock:
                if condition(dict(self.ok)) or self.failures:
                    return
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.ok}"
            time.sleep(0.1)

    @contextmanager
    def running(self, threads: int = 2) -> Iterator[Traffic]:
        workers = [threading.Thread(target=self._worker, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in workers:
                t.join(timeout=180)


def test_four_adapters_load_while_a_client_stream_runs_without_a_failed_request(
    live: Live, own: Settings, tmp_path: Path
) -> None:
    p = _prefix(tmp_path)
    warm = _copy_and_register(own, live, f"{p}-warm", "sentiment")
    asyncio.run(load_adapter(own, warm))
    new = [_copy_and_register(own, live, f"{p}-{i}", ("sentiment", "animals")[i % 2]) for i in range(4)]
    traffic = Traffic(live.server.url, [BASE, warm])
    with traffic.running():
        traffic.wait_for(lambda ok: sum(ok.values()) >= 6, "traffic before the loads")

        async def load_all() -> list[Any]:
            return await asyncio.gather(*(load_adapter(own, ref) for ref in new))

        loaded = asyncio.run(load_all())  # four at once, each through the preflight and onto vLLM
        assert [v.state for v in loaded] == ["serving"] * 4
        traffic.add(*new)  # with two adapter slots, the six adapters now swap under load
        traffic.wait_for(
            lambda ok: all(ok.get(m, 0) >= 3 for m in [*new, warm, BASE]), "every model answering"
        )
    assert traffic.failures == []
    assert set(new) <= set(_served(live.server.url))


# --- invalid adapters ----------------------------------------------------------------------------


def _wrong_base_dir(tmp_path: Path) -> Path:
    """A model directory (config only) of another size than the served demo model."""
    other = tmp_path / "other-base"
    other.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256}
    (other / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4, "vocab_size": 512}))
    return other


def _tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """Replace the weights with these lora_A tensors (random, each with its lora_B of the same rank and
    the demo base's width): sound files, so only the checks against the base can refuse them."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for key, (rank, _) in shapes.items():
        tensors[key] = torch.randn(shapes[key])
        tensors[key.replace("lora_A", "lora_B")] = torch.randn(128, rank)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _invalid_cases(root: Path, outside: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """case -> (adapter path, what the error must say)."""

    def fake(case: str, **config: object) -> Path:
        return write_fake_adapter(root / case / "v1", extra_config=dict(config))

    def broken(case: str, change: Callable[[Path], object]) -> Path:
        path = fake(case)
        change(path)
        return path

    link = root / "symlink-escape" / "v1"
    link.parent.mkdir(parents=True)
    link.symlink_to(write_fake_adapter(outside / "linked"))
    a_file = root / "not-a-dir" / "v1"
    a_file.parent.mkdir(parents=True)
    a_file.write_text("not an adapter")
    (root / "dotdot").mkdir()
    return {
        "missing": (root / "missing" / "v1", "does not exist"),
        "outside-root": (write_fake_adapter(outside / "plain"), "outside the adapters root"),
        "symlink-escape": (link, "outside the adapters root"),
        "dotdot-escape": (
            root / "dotdot" / os.path.relpath(outside / "plain", root / "dotdot"),
            "outside the adapters root",
        ),
        "not-a-dir": (a_file, "is not a directory"),
        "pickle-only": (
            write_fake_adapter(root / "pickle-only" / "v1", weights="adapter_model.bin"),
            "pickle",
        ),
        "pickle-beside": (
            broken("pickle-beside", lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x04pickle")),
            "pickle-based weights",
        ),
        "no-weights": (
            broken("no-weights", lambda p: (p / "adapter_model.safetensors").unlink()),
            "has no adapter_model.safetensors",
        ),
        "damaged-safetensors": (
            broken(
                "damaged-safetensors", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
            ),
            "not a valid safetensors file",
        ),
        "no-config": (
            broken("no-config", lambda p: (p / "adapter_config.json").unlink()),
            "has no adapter_config",
        ),
        "bad-json": (
            broken("bad-json", lambda p: (p / "adapter_config.json").write_text("{not json")),
            "not valid JSON",
        ),
        "not-lora": (fake("not-lora", peft_type="IA3"), "not 'LORA'"),
        "rank-too-high": (
            write_fake_adapter(root / "rank-too-high" / "v1", r=16),
            "exceeds the server's max_lora_rank 8",
        ),
        "rank-pattern-too-high": (
            fake("rank-pattern-too-high", rank_pattern={"q_proj": 32}),
            "rank 32 exceeds",
        ),
        "dora": (fake("dora", use_dora=True), "DoRA"),
        "lora-bias": (fake("lora-bias", lora_bias=True), "LoRA bias"),
        "bias-all": (fake("bias-all", bias="all"), "bias='all'"),
        "pissa-init": (fake("pissa-init", init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        "alora": (fake("alora", alora_invocation_tokens=[1, 2]), "aLoRA"),
        "layer-replication": (fake("layer-replication", layer_replication=[[0, 1]]), "layer_replication"),
        "no-alpha": (fake("no-alpha", lora_alpha=None), "missing lora_alpha"),
        "modules-to-save": (
            fake("modules-to-save", modules_to_save=["lm_head"]),
            r"modules_to_save \['lm_head'\]",
        ),
        "classifier-on-causal-lm": (
            fake("classifier-on-causal-lm", modules_to_save=["classifier"]),
            "needs a classification model",
        ),
        "wrong-base-by-name": (
            fake("wrong-base-by-name", base_model_name_or_path=str(_wrong_base_dir(tmp_path))),
            "wrong base model: it was trained on",
        ),
        "wrong-base-by-shape": (
            _tensors(fake("wrong-base-by-shape"), {Q_A: (8, 64)}),
            r"wrong base model: .*shape \[8, 64\]",
        ),
        "absent-target-module": (
            fake("absent-target-module", target_modules=["c_attn"]),
            "are not modules of",
        ),
        "absent-layer": (
            _tensors(fake("absent-layer"), {Q_A.replace("layers.0", "layers.9"): (8, 128)}),
            "which the served base model",
        ),
    }


def test_invalid_adapters_are_refused_before_vllm_while_good_traffic_continues(
    live: Live, own: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = live.server.url
    p = _prefix(tmp_path)
    root = own.adapters_dir / f"{p}-invalid"
    cases = _invalid_cases(root, tmp_path / "outside", tmp_path)
    assert len(cases) >= 25
    good = _copy_and_register(own, live, f"{p}-good", "sentiment")
    asyncio.run(load_adapter(own, good))

    asked: list[str] = []  # a spy on the real client: every load that reached vLLM
    real_load = client_module.VLLMAdminClient.load_adapter

    async def spy(self: VLLMAdminClient, name: str, path: str) -> bool:
        asked.append(name)
        return await real_load(self, name, path)

    monkeypatch.setattr(client_module.VLLMAdminClient, "load_adapter", spy)
    before = set(_served(url))
    traffic = Traffic(url, [BASE, good])
    refused: dict[str, str] = {}
    with traffic.running():
        traffic.wait_for(lambda ok: sum(ok.values()) >= 4, "traffic before the invalid loads")
        for case, (path, _) in cases.items():
            # what a user does: register (the checks that need no server), then load (all of them)
            try:
                register_adapter(own, path, name=f"{p}-{case}", version="v1")
                asyncio.run(load_adapter(own, f"{p}-{case}@v1"))
            except LoraplaneError as exc:
                refused[case] = str(exc)
        traffic.wait_for(lambda ok: sum(ok.values()) >= 30, "traffic after the invalid loads")
    assert traffic.failures == []
    unclear = {
        c: refused.get(c, "(not refused)")
        for c, (_, want) in cases.items()
        if not re.search(want, refused.get(c, ""))
    }
    assert unclear == {}, "refused without the expected reason, or not refused"
    assert asked == [], "vLLM was asked to load an invalid adapter"
    assert set(_served(url)) == before
    assert httpx.get(f"{url}/health").status_code == 200


def test_vllm_answers_map_to_typed_errors_and_loads_are_idempotent(
    live: Live, own: Settings, tmp_path: Path
) -> None:
    """Straight to vLLM, no preflight: what vLLM itself refuses, and how the client maps it."""
    url = live.server.url
    p = _prefix(tmp_path)
    root = own.adapters_dir / f"{p}-raw"
    good = own.adapters_dir / f"{p}-same" / "v1"
    shutil.copytree(live.adapters["animals"], good)
    refused: dict[str, tuple[type[Exception], str]] = {
        "missing": (AdapterNotFoundError, "No adapter found"),
        "rank": (AdapterRejectedError, "greater than max_lora_rank"),
        "dora": (AdapterRejectedError, "DoRA"),
        "save": (AdapterRejectedError, "modules_to_save"),
        "empty": (AdapterBadRequestError, "must be provided"),
    }
    paths = {
        "missing": str(root / "missing"),
        "rank": str(write_fake_adapter(root / "rank", r=16)),
        "dora": str(write_fake_adapter(root / "dora", extra_config={"use_dora": True})),
        "save": str(write_fake_adapter(root / "save", extra_config={"modules_to_save": ["lm_head"]})),
        "empty": str(good),
    }

    async def go() -> None:
        async with VLLMAdminClient(url, api_key=API_KEY) as client:
            for case, (error, message) in refused.items():
                name = "" if case == "empty" else f"{p}-raw-{case}@v1"
                with pytest.raises(error, match=message):
                    await client.load_adapter(name, paths[case])
            assert await client.health()
            # four concurrent loads of one name through one client: one load, three no-ops
            name = f"{p}-same@v1"
            results = await asyncio.gather(*(client.load_adapter(name, str(good)) for _ in range(4)))
            assert sorted(results) == [False, False, False, True]
            # through other clients (vLLM's own lock, then our check): no error, no second load
            async with VLLMAdminClient(url, api_key=API_KEY) as other:
                assert await other.load_adapter(name, str(good)) is False
                with pytest.raises(AdapterConflictError, match="served names are immutable"):
                    await other.load_adapter(name, paths["rank"])
            assert await client.unload_adapter(name) is True
            assert await client.unload_adapter(name) is False

    asyncio.run(go())
    assert not {f"{p}-raw-{c}@v1" for c in refused} & set(_served(url))
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_promotion_that_cannot_reach_every_replica_changes_nothing(
    live: Live, own: Settings, tmp_path: Path
) -> None:
    url = live.server.url
    p = _prefix(tmp_path)
    v1 = _copy_and_register(own, live, f"{p}-bot", "sentiment")
    asyncio.run(promote_adapter(own, v1, force=True, reason="first", server_urls=[url]))
    copy = own.adapters_dir / f"{p}-bot" / "v2"
    shutil.copytree(live.adapters["animals"], copy)
    register_adapter(own, copy, name=f"{p}-bot", version="v2")
    with socket.socket() as closed:  # a replica that is down: bound, never listening
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        before = (own.home / "registry.json").read_bytes()
        with pytest.raises(ServerUnavailableError, match=re.escape(down)):
            asyncio.run(
                promote_adapter(own, f"{p}-bot@v2", force=True, reason="two", server_urls=[url, down])
            )
    assert (own.home / "registry.json").read_bytes() == before, "the registry changed"
    assert f"{p}-bot@v2" not in _served(url), "the replica that loaded v2 did not unload it again"
    entry, previous = asyncio.run(
        promote_adapter(own, f"{p}-bot@v2", force=True, reason="two", server_urls=[url])
    )
    assert (entry.version, previous) == ("v2", "v1") and f"{p}-bot@v2" in _served(url)


@pytest.mark.k8s
def test_readiness_reads_the_kubernetes_registry(
    live: Live, k8s_settings: Settings, k8s_cluster: Cluster, tmp_path: Path
) -> None:
    settings = k8s_settings.model_copy(
        update={
            "adapters_root": live.settings.adapters_dir,
            "server_url": live.server.url,
            "api_key": API_KEY,
        }
    )
    name = f"{_prefix(tmp_path)}-k8s"
    ref = _copy_and_register(settings, live, name, "sentiment")
    argv = [
        sys.executable, "-m", "loraplane.serving.readiness", "--url", live.server.url, "--base-model", BASE,
        "--registry", "kubernetes", "--namespace", settings.namespace, "--timeout", "30",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_API_KEY": API_KEY, "KUBECONFIG": str(k8s_cluster.kubeconfig)}

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=90)

    first = probe()
    assert first.returncode == 1 and first.stderr.strip().endswith(f"not loaded: {ref}"), first.stderr
    report = asyncio.run(sync_adapters(settings, [live.server.url], prune_unknown=False))
    assert report.ok and report.replicas[0].loaded == [ref], report
    second = probe()
    assert second.returncode == 0 and second.stderr == "", second.stderr
