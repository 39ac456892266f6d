"""`adapters merge`: a LoRA adapter merged into its base model gives the adapter's outputs, as a plain
safetensors model directory that is written completely or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from loraplane.common.adapter_dir import AdapterPreflightError
from loraplane.common.errors import InvalidInputError
from loraplane.common.files import sha256_file
from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter
from loraplane.platform.cli import app
from loraplane.trainer.merge import PROVENANCE_FILE, merge_adapter

TOKENS = torch.tensor([[5, 17, 42, 99, 230, 7]])
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", PROVENANCE_FILE}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def make_adapter(directory: Path, base: Path, *, name: str = "bot", version: str = "v1", **lora: Any) -> Path:
    """A LoRA adapter with random (non-zero) weights on ``base``, published like the trainer does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM", **lora
    )
    get_peft_model(model, config).save_pretrained(str(directory))
    (directory / "README.md").unlink(missing_ok=True)
    manifest = {
        "schema": "loraplane.adapter-manifest/v1",
        "name": name,
        "version": version,
        "created_at": "2026-01-01T00:00:00+00:00",
        "base_model": {"path": str(base), "revision": None},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "metrics": {"train_loss": 1.0},
        "weights_sha256": sha256_file(directory / "adapter_model.safetensors"),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def logits(model_or_dir: Any) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir)
    with torch.no_grad():
        return model(TOKENS).logits  # type: ignore[no-any-return]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_model_gives_the_adapters_outputs(demo_model: Path, tmp_path: Path, dora: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tmp_path / "adapters" / "bot" / "v1", demo_model, use_dora=dora)
    merged = merge_adapter(adapter, tmp_path / "merged")

    assert merged.path == tmp_path / "merged" and merged.base_model == str(demo_model)
    assert merged.dtype == "float32"  # auto: what the base checkpoint is stored in
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), adapter)
    with_adapter = logits(peft_model)
    torch.testing.assert_close(logits(merged.path), with_adapter, atol=1e-5, rtol=1e-5)
    assert (logits(merged.path) - logits(demo_model)).abs().max() > 0.1

    files = {p.name for p in merged.path.iterdir()}
    assert files == MODEL_FILES | TOKENIZER_FILES | {"chat_template.jinja"}  # weights, configs, tokenizer
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not [f for f in files if f.startswith("adapter_")]  # a plain model, no LoRA left
    assert set(merged.weights_sha256) == {"model.safetensors"}
    assert merged.weights_sha256["model.safetensors"] == sha256_file(merged.path / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]

    provenance = json.loads((merged.path / PROVENANCE_FILE).read_text())
    assert provenance["adapter"]["path"] == str(adapter.resolve())
    assert (provenance["adapter"]["name"], provenance["adapter"]["version"]) == ("bot", "v1")
    assert provenance["adapter"]["weights_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert provenance["adapter"]["use_dora"] is dora
    assert provenance["base_model"] == {"path": str(demo_model), "revision": None, "from": "manifest.json"}
    assert provenance["weights_sha256"] == merged.weights_sha256
    assert {"torch", "transformers", "peft", "loraplane"} <= set(provenance["environment"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged.path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"


def test_dtype_option_sets_the_written_dtype(demo_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", demo_model)
    merged = merge_adapter(adapter, tmp_path / "merged", dtype="bfloat16")
    assert merged.dtype == "bfloat16"
    assert json.loads((merged.path / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(InvalidInputError, match="'int8' is not one of auto, float32, bfloat16, float16"):
        merge_adapter(adapter, tmp_path / "other", dtype="int8")


def test_existing_out_dir_is_refused_and_left_untouched(demo_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", demo_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="already exists"):
        merge_adapter(adapter, out)
    assert tree(out) == {"keep.txt": b"mine"}


def test_pickle_adapter_is_refused_and_nothing_is_written(demo_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", demo_model)
    torch.save({"x": torch.zeros(1)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterPreflightError, match="pickle-based weights"):
        merge_adapter(adapter, tmp_path / "out" / "merged")
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_the_base_is_refused(demo_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = make_adapter(tmp_path / "adapter", demo_model)
    # Bases the adapter was not trained on: fewer layers (modules it targets are missing), wider MLPs.
    for change in ({"num_hidden_layers": 1}, {"intermediate_size": 384}):
        other = tmp_path / "base-{}-{}".format(*next(iter(change.items())))
        config = AutoConfig.from_pretrained(demo_model)
        for key, value in change.items():
            setattr(config, key, value)
        AutoModelForCausalLM.from_config(config).save_pretrained(other)
        for name in TOKENIZER_FILES:
            shutil.copy(demo_model / name, other / name)
        with pytest.raises(InvalidInputError, match=f"does not fit base model '{other}'"):
            merge_adapter(adapter, tmp_path / "merged", base_model=str(other))
        assert not (tmp_path / "merged").exists()

    # An adapter file that lacks weights for a module its config targets.
    weights = load_file(adapter / "adapter_model.safetensors")
    missing = next(k for k in weights if "layers.1.self_attn.q_proj.lora_B" in k)
    save_file({k: v for k, v in weights.items() if k != missing}, adapter / "adapter_model.safetensors")
    (adapter / "manifest.json").unlink()
    with pytest.raises(InvalidInputError, match="1 missing and 0 unexpected adapter weights"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(demo_model))
    assert not (tmp_path / "merged").exists()


def test_base_model_that_cannot_be_found_is_named(demo_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", demo_model)
    manifest = json.loads((adapter / "manifest.json").read_text())
    manifest["base_model"]["path"] = str(tmp_path / "gone")
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match=f"base model directory {tmp_path / 'gone'} \\(from manifest"):
        merge_adapter(adapter, tmp_path / "merged")
    # --base-model overrides what the adapter records
    merged = merge_adapter(adapter, tmp_path / "merged", base_model=str(demo_model))
    assert json.loads((merged.path / PROVENANCE_FILE).read_text())["base_model"]["from"] == "--base-model"


def test_weights_that_do_not_match_the_manifest_are_refused(demo_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", demo_model)
    manifest = json.loads((adapter / "manifest.json").read_text())
    (adapter / "manifest.json").write_text(json.dumps({**manifest, "weights_sha256": "0" * 64}))
    with pytest.raises(InvalidInputError, match="does not match the weights_sha256"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _invoke(settings: Settings, *args: str) -> Any:
    env = {
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "COLUMNS": "200",
    }
    return CliRunner().invoke(app, list(args), env=env)


def test_cli_merges_a_registry_ref_and_a_path(demo_model: Path, tmp_path: Path, settings: Settings) -> None:
    adapter = make_adapter(settings.adapters_dir / "bot" / "v1", demo_model)
    register_adapter(settings, adapter)

    result = _invoke(settings, "adapters", "merge", "bot@v1", "--out", str(tmp_path / "m1"))
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "m1") in result.stdout
    assert f"merged bot@v1 into {demo_model}: float32, 1 weight file(s)" in result.stdout
    assert json.loads((tmp_path / "m1" / PROVENANCE_FILE).read_text())["adapter"]["ref"] == "bot@v1"

    result = _invoke(settings, "adapters", "merge", str(adapter), "--out", str(tmp_path / "m2"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m2" / "model.safetensors").read_bytes() == (
        tmp_path / "m1" / "model.safetensors"
    ).read_bytes()

    result = _invoke(settings, "adapters", "merge", "bot@v1", "--out", str(tmp_path / "m1"))
    assert result.exit_code == 2 and "already exists" in result.stderr

    result = _invoke(settings, "adapters", "merge", "bot@v7", "--out", str(tmp_path / "m3"))
    assert result.exit_code == 2 and "no version 'v7'" in result.stderr

    # Weights changed after registration: refused (exit 3) before anything is loaded or written.
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    result = _invoke(settings, "adapters", "merge", "bot@v1", "--out", str(tmp_path / "m4"))
    assert result.exit_code == 3 and "changed since registration" in result.stderr
    assert not (tmp_path / "m4").exists()
