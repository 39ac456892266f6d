"""The offline demo base model: deterministic, Llama architecture, servable head size, chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraplane.trainer.demo_model import build_demo_model


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files(demo_model: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again")
    assert _digest(again) == _digest(demo_model)


def test_model_is_a_small_llama_in_safetensors(demo_model: Path) -> None:
    config = json.loads((demo_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64  # a head size vLLM's CPU attention backend supports
    assert (demo_model / "model.safetensors").is_file()
    assert not list(demo_model.glob("*.bin"))


def test_tokenizer_has_chat_template_with_assistant_mask(demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    messages = [
        {"role": "user", "content": "What sound does a cow make?"},
        {"role": "assistant", "content": "moo"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nWhat sound does a cow make?<|end|>\n<|assistant|>\nmoo<|end|>\n"
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == "moo<|end|>"
    assert tok.decode(tok("Classify the sentiment.")["input_ids"]) == "Classify the sentiment."


def test_existing_directory_is_never_overwritten(demo_model: Path) -> None:
    import pytest

    before = _digest(demo_model)
    with pytest.raises(FileExistsError):
        build_demo_model(demo_model)
    assert _digest(demo_model) == before
