"""The two checks against silent failures, on the real vLLM server with adapters the trainer made:

- registration compares the chat template the adapter was trained with (recorded in its manifest)
  with the one the server uses for the base model, and refuses a mismatch unless overridden with a
  reason that the history keeps (``platform/template_check.py``);
- after a load, one fixed prompt goes to the adapter and to the base model: an adapter that changes
  nothing is unloaded again, never served or promoted, and the history says why
  (``serving/output_probe.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import API_KEY, BASE, Live

from loraplane.common.chat_templates import template_sha256
from loraplane.common.settings import Settings
from loraplane.platform.adapters import load_adapter, promote_adapter, register_adapter, sync_adapters
from loraplane.platform.template_check import TemplateMismatchError, served_template
from loraplane.registry.local import LocalRegistry
from loraplane.serving.adapter_weights import AdapterWeightsError
from loraplane.serving.client import VLLMAdminClient
from loraplane.serving.output_probe import AdapterHasNoEffectError, probe_output

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300


def _own_settings(live: Live, tmp_path: Path) -> Settings:
    """The live server and adapters root, with a registry of the test's own."""
    return live.settings.model_copy(update={"home": tmp_path / "state"})


def _unique(tmp_path: Path) -> str:
    """A name of the test's own: served names live on the session's one server."""
    return re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-40:].strip("-")


def _copy(live: Live, task: str, name: str, version: str = "v1") -> Path:
    copy = live.settings.adapters_dir / name / version
    shutil.copytree(live.adapters[task], copy)
    return copy


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "LORAPLANE_API_KEY": API_KEY,
        "COLUMNS": "300",  # rich wraps messages at the terminal width
    }
    return subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _served(settings: Settings) -> set[str]:
    response = httpx.get(f"{settings.server_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return {m["id"] for m in response.json()["data"]}


# --- chat template ------------------------------------------------------------------------------------


def test_the_trainer_records_its_template_and_it_matches_the_served_base(
    live: Live, demo_model: Path
) -> None:
    manifest = json.loads((live.adapters["sentiment"] / "manifest.json").read_text())
    record = manifest["chat_template"]
    own = (demo_model / "chat_template.jinja").read_text(encoding="utf-8")
    assert record["text"].rstrip("\n") == own.rstrip("\n"), "the demo tokenizer's own template"
    assert record["sha256"] == template_sha256(own)
    assert record["source"] == f"the tokenizer of {demo_model}"

    served = served_template(live.settings)  # a server started by hand: learnt from GET /v1/models
    assert not isinstance(served, str), served
    assert served.sha256 == record["sha256"] and "chat_template.jinja" in served.source
    # the session's adapters registered (conftest's `live`) with no override in their history
    events = [e for e in LocalRegistry(live.settings.home).read().history if e.action == "register"]
    assert events and all(e.reason is None and not e.forced for e in events)


def test_a_template_mismatch_is_refused_and_the_override_keeps_its_reason(live: Live, tmp_path: Path) -> None:
    settings, name = _own_settings(live, tmp_path), _unique(tmp_path)
    path = _copy(live, "sentiment", name)
    manifest_file = path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    original = manifest["chat_template"]["text"]
    text = original.replace("'<|assistant|>\\n'", "'<|assistant|> '", 1)  # one character changed
    assert text != original
    manifest["chat_template"].update(text=text, sha256=template_sha256(text))
    manifest_file.write_text(json.dumps(manifest, indent=2))

    refused = _cli(settings, "adapters", "register", str(path), "--name", name, "--version", "v1")
    assert refused.returncode == 2, refused.stderr
    said = refused.stderr
    assert "trained with another chat template than the server uses" in said
    assert "adapter: the adapter's manifest (the tokenizer of " in said  # both sources named
    assert "chat_template.jinja" in said and "GET /v1/models" in said
    assert "first differing line (1, column " in said
    assert "- adapter: \"...= 'assistant' %}{{ '<|assistant|> ' }}" in said  # where it differs
    assert "+ server:  \"...= 'assistant' %}{{ '<|assistant|>\\\\n' }}" in said
    assert "--allow-template-mismatch --reason TEXT" in said and "Traceback" not in said
    assert not (settings.home / "registry.json").exists() or name not in (
        LocalRegistry(settings.home).read().adapters
    ), "nothing registered"
    with pytest.raises(TemplateMismatchError):  # the library refuses it the same way
        register_adapter(settings, path, name=name, version="v1")

    no_reason = _cli(
        settings,
        "adapters",
        "register",
        str(path),
        "--name",
        name,
        "--version",
        "v1",
        "--allow-template-mismatch",
    )
    assert no_reason.returncode == 2 and "needs --reason" in no_reason.stderr, no_reason.stderr

    reason = "served with the new template on purpose; evaluated below"
    allowed = _cli(
        settings,
        "adapters",
        "register",
        str(path),
        "--name",
        name,
        "--version",
        "v1",
        "--allow-template-mismatch",
        "--reason",
        reason,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert f"registered {name}@v1" in allowed.stdout
    assert "first differing line (1, column " in allowed.stderr and reason in allowed.stderr  # still shown
    event = LocalRegistry(settings.home).read().history[-1]
    assert (event.action, event.adapter, event.version, event.forced) == ("register", name, "v1", True)
    assert event.reason == f"chat template mismatch allowed: {reason}"
    shown = _cli(settings, "adapters", "show", name, "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["history"][-1]["reason"] == event.reason


def test_an_adapter_without_a_recorded_template_is_registered_with_a_warning(
    live: Live, tmp_path: Path
) -> None:
    settings, name = _own_settings(live, tmp_path), _unique(tmp_path)
    path = _copy(live, "sentiment", name)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["chat_template"]  # what an adapter published by an older loraplane has
    (path / "manifest.json").write_text(json.dumps(manifest))
    proc = _cli(settings, "adapters", "register", str(path), "--name", name, "--version", "v1")
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "records no chat template" in proc.stderr
    assert LocalRegistry(settings.home).read().resolve(f"{name}@v1").state == "registered"


# --- output probe -------------------------------------------------------------------------------------


def _untrained_adapter(live: Live, demo_model: Path, directory: Path, *, b_value: float = 0.0) -> Path:
    """What PEFT writes before training: its default init (``init_lora_weights=True``) makes every B
    zero, so the update B @ A is zero. With ``b_value``, every B entry is that value instead: an
    adapter whose update vanishes in float32 (what the weight checks cannot call "all zeros")."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    trained = json.loads((live.adapters["sentiment"] / "adapter_config.json").read_text())
    config = LoraConfig(
        r=trained["r"],
        lora_alpha=trained["lora_alpha"],
        target_modules=trained["target_modules"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model), config)
    model.save_pretrained(directory)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert all(not t.any() for k, t in tensors.items() if "lora_B" in k), "PEFT's init: B = 0"
    if b_value:
        tensors = {k: torch.full_like(t, b_value) if "lora_B" in k else t for k, t in tensors.items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return directory


def test_vllm_serves_an_all_zero_adapter_exactly_like_the_base_and_the_probe_sees_it(
    live: Live, demo_model: Path, tmp_path: Path
) -> None:
    """The literal case: an untrained adapter (B = 0). The weight checks refuse it at registration;
    handed to vLLM directly, vLLM loads it and answers exactly as the base model, which the probe says."""
    name = _unique(tmp_path)
    path = _untrained_adapter(live, demo_model, live.settings.adapters_dir / name / "v1")
    with pytest.raises(AdapterWeightsError, match="every lora_B tensor is all zeros"):
        register_adapter(_own_settings(live, tmp_path), path, name=name, version="v1")

    async def go() -> None:
        async with VLLMAdminClient(live.settings.server_url, api_key=API_KEY) as client:
            assert await client.load_adapter(f"{name}@v1", str(path))  # vLLM takes it without a word
            try:
                result = await probe_output(client, f"{name}@v1")
            finally:
                await client.unload_adapter(f"{name}@v1")
        assert result.changed is False and result.base == BASE, result
        assert result.max_difference == 0.0, result  # the same computation: not even rounding differs

    asyncio.run(go())


def test_an_adapter_that_changes_nothing_is_rolled_back_never_served_or_promoted(
    live: Live, demo_model: Path, tmp_path: Path
) -> None:
    settings, name = _own_settings(live, tmp_path), _unique(tmp_path)
    path = _untrained_adapter(live, demo_model, settings.adapters_dir / name / "v1", b_value=1e-30)
    register_adapter(settings, path, name=name, version="v1")  # nonzero weights: the file checks pass
    ref = f"{name}@v1"

    with pytest.raises(AdapterHasNoEffectError) as caught:
        asyncio.run(load_adapter(settings, ref))
    message = str(caught.value)
    assert f"{ref} changes nothing" in message and f"exactly as the base model {BASE}" in message
    assert "the load was rolled back" in message and "hint:" in message
    assert ref not in _served(settings), "unloaded again"
    state = LocalRegistry(settings.home).read()
    entry = state.resolve(ref)
    assert entry.state == "registered" and entry.failure is not None
    assert entry.failure.reason.startswith(f"{ref} changes nothing")
    assert entry.failure.server == settings.server_url
    event = state.history[-1]
    assert (event.action, event.version) == ("load-failed", "v1") and event.reason == entry.failure.reason

    with pytest.raises(AdapterHasNoEffectError):  # a forced promotion loads it first: refused too
        asyncio.run(promote_adapter(settings, ref, force=True, reason="try anyway"))
    after = LocalRegistry(settings.home).read()
    assert after.adapter(name).aliases == {} and after.resolve(ref).state == "registered"
    assert ref not in _served(settings)

    # the CLI says the same, exit 2; and sync (what a restarted replica's reconciler runs) fails it too
    proc = _cli(settings, "adapters", "load", ref)
    assert proc.returncode == 2 and f"{ref} changes nothing" in proc.stderr, proc.stderr
    report = asyncio.run(sync_adapters(settings, [settings.server_url], prune_unknown=False))
    (replica,) = report.replicas
    assert ref in replica.failed and replica.failed[ref].startswith(f"{ref} changes nothing"), (
        report.to_json()
    )
    assert ref not in replica.loaded and ref not in _served(settings)


def test_a_trained_adapter_passes_the_probe_and_is_served(live: Live, tmp_path: Path) -> None:
    settings, name = _own_settings(live, tmp_path), _unique(tmp_path)
    path = _copy(live, "sentiment", name)
    register_adapter(settings, path, name=name, version="v1")
    entry = asyncio.run(load_adapter(settings, f"{name}@v1"))
    assert entry.state == "serving" and entry.failure is None
    assert f"{name}@v1" in _served(settings)

    async def probe() -> None:
        async with VLLMAdminClient(settings.server_url, api_key=API_KEY) as client:
            result = await probe_output(client, f"{name}@v1")
        assert result.changed is True and result.max_difference > 1e-3, result

    asyncio.run(probe())
    actions = [e.action for e in LocalRegistry(settings.home).read().history]
    assert actions == ["register", "load"]
