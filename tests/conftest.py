"""Shared fixtures: the demo base model, trained adapters and one real vLLM server per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplane.platform.settings import Settings


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplane.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("base") / "demo-model")


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
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(r, 128)}
    if weights.endswith(".safetensors"):
        save_file(tensors, str(directory / weights))
    else:
        torch.save(tensors, directory / weights)
    return directory


@pytest.fixture
def fake_adapter(settings: Settings) -> Iterator[Path]:
    yield write_fake_adapter(settings.adapters_dir / "demo" / "v1")
