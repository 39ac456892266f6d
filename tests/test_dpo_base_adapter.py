"""``base_adapter: NAME@vN`` resolved once, checked the same way in both places that resolve it.

``loraplane train submit`` (cluster runs) resolves the version with the CLI user's registry access
(:func:`~loraplane.trainer.dpo.resolve_for_submit`) and hands the pod ``LORAPLANE_BASE_ADAPTER``; the
trainer takes that instead of reading a registry, and still verifies the weights
(:func:`~loraplane.trainer.dpo.resolve_base_adapter`). No training here: tests/test_dpo.py trains
locally, tests/test_training_k8s.py runs the pod's command on a submitted Job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import write_fake_adapter

from loraplane.common.errors import InvalidInputError
from loraplane.common.files import sha256_file
from loraplane.common.settings import Settings
from loraplane.registry.backends import open_registry
from loraplane.registry.model import Adapter, AdapterVersion
from loraplane.trainer.checkpoints import base_model_files_digest
from loraplane.trainer.config import TrainJobConfig
from loraplane.trainer.dpo import (
    BASE_ADAPTER_ENV,
    BaseAdapterChangedError,
    ResolvedBaseAdapter,
    resolve_base_adapter,
    resolve_for_submit,
)
from loraplane.trainer.exit_codes import DO_NOT_RETRY


def _base_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(b"0" * 64)
    return directory


def _adapter(directory: Path, base: dict[str, Any]) -> Path:
    """A real LoRA directory with the manifest a loraplane SFT run writes (the parts read here)."""
    write_fake_adapter(directory)
    manifest = {
        "method": "sft",
        "run_id": "run-sft-1",
        "base_model": base,
        "weights_sha256": sha256_file(directory / "adapter_model.safetensors"),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _register(settings: Settings, ref: str, path: str, manifest: dict[str, Any], **fields: Any) -> None:
    name, version = ref.split("@")
    with open_registry(settings).transaction() as state:
        adapter = state.adapters.setdefault(name, Adapter(name=name))
        adapter.versions[version] = AdapterVersion(
            name=name,
            version=version,
            served_name=ref,
            path=path,
            weights_sha256=manifest.get("weights_sha256", "c" * 64),
            manifest=manifest,
            **fields,
        )


def _config(base_model: str, ref: str, **tree: Any) -> TrainJobConfig:
    return TrainJobConfig.model_validate(
        {
            "method": "dpo",
            "base_model": {"path": base_model},
            "base_adapter": ref,
            "dataset": {"path": "/data/datasets/prefs.jsonl"},
            "output": {"adapters_root": "/data/adapters", "name": "bot-dpo"},
            **tree,
        }
    )


def test_submit_resolves_a_registered_version_and_refuses_what_the_trainer_would(
    settings: Settings, tmp_path: Path
) -> None:
    """Registered, not retired, on the job's base model (by name: the files are on the cluster's
    volume), and the weights verified when this machine can read them; every refusal is exit 2."""
    on_volume = {"path": "/data/models/base", "files_sha256": "f" * 64}
    _register(
        settings, "bot@v1", "/data/adapters/bot/v1", {"base_model": on_volume, "weights_sha256": "a" * 64}
    )
    _register(settings, "bot@v2", "/data/adapters/bot/v2", {"base_model": on_volume}, state="retired")
    _register(settings, "other@v1", "/data/adapters/other/v1", {"base_model": {"path": "/data/models/other"}})
    fetched = {"path": "/data/models/org--tiny@main", "source": "hf://org/tiny@main"}
    _register(settings, "hub@v1", "/data/adapters/hub/v1", {"base_model": fetched})
    here = _adapter(tmp_path / "adapters" / "here" / "v1", on_volume)
    _register(settings, "here@v1", str(here), json.loads((here / "manifest.json").read_text()))

    resolved = resolve_for_submit(settings, _config("/data/models/base", "bot@v1"))
    assert resolved == ResolvedBaseAdapter("bot@v1", "/data/adapters/bot/v1", "a" * 64)
    assert json.loads(resolved.to_env()) == {
        "ref": "bot@v1", "path": "/data/adapters/bot/v1", "weights_sha256": "a" * 64,
    }  # fmt: skip
    assert ResolvedBaseAdapter.from_env(resolved.to_env()) == resolved
    # an hf:// base model is the directory it was fetched to (the manifest records both)
    for ref in ("hf://org/tiny", "hf://org/tiny@main", "/data/models/org--tiny@main"):
        assert resolve_for_submit(settings, _config(ref, "hub@v1")) is not None, ref
    assert resolve_for_submit(settings, _config("/data/models/base", "here@v1")) is not None

    refusals = {
        "bot@v9": "base_adapter: 'bot@v9' is not in the registry (local registry at",
        "nobody@v1": "base_adapter: 'nobody@v1' is not in the registry",
        "bot@v2": "base_adapter: bot@v2 is retired",
        "other@v1": "base_adapter: other@v1 was trained on base model '/data/models/other', not on this "
        "job's base_model.path '/data/models/base' (by its recorded name and source)",
    }
    for ref, message in refusals.items():
        with pytest.raises(InvalidInputError) as caught:
            resolve_for_submit(settings, _config("/data/models/base", ref))
        assert message in caught.value.message and caught.value.exit_code == 2
    with pytest.raises(InvalidInputError, match="trained on base model '/data/models/org--tiny@main'"):
        resolve_for_submit(settings, _config("hf://org/tiny@v2", "hub@v1"))

    (here / "adapter_model.safetensors").write_bytes(b"swapped")  # readable here: checked here
    with pytest.raises(BaseAdapterChangedError, match=r"here@v1: .* changed since registration") as changed:
        resolve_for_submit(settings, _config("/data/models/base", "here@v1"))
    assert changed.value.exit_code == DO_NOT_RETRY


def test_the_trainer_takes_the_pre_resolved_adapter_without_a_registry_and_verifies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _base_model(tmp_path / "models" / "base")
    recorded = {"path": "/elsewhere/base", "files_sha256": base_model_files_digest(str(base))}
    adapter = _adapter(tmp_path / "adapters" / "bot" / "v1", recorded)
    weights = sha256_file(adapter / "adapter_model.safetensors")
    resolved = ResolvedBaseAdapter("bot@v1", str(adapter), weights)
    # a registry that cannot be read: the pod has none
    monkeypatch.setenv("LORAPLANE_REGISTRY", "kubernetes")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv(BASE_ADAPTER_ENV, resolved.to_env())

    config, found = resolve_base_adapter(_config(str(base), "bot@v1"))
    assert found is not None and found.to_manifest() == {
        "ref": "bot@v1",
        "path": str(adapter),
        "weights_sha256": weights,
        "method": "sft",
        "run_id": "run-sft-1",
    }
    assert (config.lora.r, config.lora.target_modules) == (8, ["q_proj", "v_proj"]), "the adapter's shape"

    with pytest.raises(
        InvalidInputError, match=f"{BASE_ADAPTER_ENV} was resolved for bot@v1, but base_adapter is bot@v2"
    ):
        resolve_base_adapter(_config(str(base), "bot@v2"))
    for bad, message in {
        "not json": "not JSON with ref, path and weights_sha256",
        json.dumps({"ref": "bot@v1", "path": "rel/dir", "weights_sha256": weights}): "is not an absolute",
        json.dumps({"ref": "bot@v1", "path": str(adapter), "weights_sha256": "abc"}): "is not a sha256",
        json.dumps(["bot@v1"]): "not JSON with ref",
    }.items():
        monkeypatch.setenv(BASE_ADAPTER_ENV, bad)
        with pytest.raises(InvalidInputError, match=message) as caught:
            resolve_base_adapter(_config(str(base), "bot@v1"))
        assert caught.value.message.startswith(f"{BASE_ADAPTER_ENV}: ")

    monkeypatch.setenv(BASE_ADAPTER_ENV, resolved.to_env())
    other = _base_model(tmp_path / "models" / "other")
    (other / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(InvalidInputError, match=r"their config\.json / weight files differ"):
        resolve_base_adapter(_config(str(other), "bot@v1"))

    (adapter / "adapter_model.safetensors").write_bytes(b"swapped")
    with pytest.raises(BaseAdapterChangedError, match="changed since registration") as changed:
        resolve_base_adapter(_config(str(base), "bot@v1"))
    assert changed.value.exit_code == DO_NOT_RETRY
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(BaseAdapterChangedError, match=r"adapter_model\.safetensors is gone"):
        resolve_base_adapter(_config(str(base), "bot@v1"))
