"""Adapters are checked before any server is asked to load them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import write_fake_adapter

from loraplane.common.adapter_dir import AdapterPreflightError
from loraplane.serving.base_model import BaseModelFacts, load_base_model
from loraplane.serving.preflight import preflight_adapter


def test_good_adapter_passes(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1")
    info = preflight_adapter(path, adapters_root=tmp_path / "root", max_lora_rank=8)
    assert info.rank == 8
    assert info.path == path.resolve()


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterPreflightError, match="does not exist"):
        preflight_adapter(tmp_path / "root" / "nope", adapters_root=tmp_path / "root")


def test_path_outside_root_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "elsewhere" / "bot")
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    outside = write_fake_adapter(tmp_path / "elsewhere" / "bot")
    link = tmp_path / "root" / "bot" / "v1"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(link, adapters_root=tmp_path / "root")


def test_dotdot_escaping_root_is_refused(tmp_path: Path) -> None:
    write_fake_adapter(tmp_path / "elsewhere" / "bot")
    (tmp_path / "root").mkdir()
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(tmp_path / "root" / ".." / "elsewhere" / "bot", adapters_root=tmp_path / "root")


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", weights="adapter_model.bin")
    with pytest.raises(AdapterPreflightError, match="pickle-based weights"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_rank_above_server_limit_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", r=16)
    with pytest.raises(AdapterPreflightError, match="rank 16 exceeds the server's max_lora_rank 8"):
        preflight_adapter(path, adapters_root=tmp_path / "root", max_lora_rank=8)


def test_dora_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", extra_config={"use_dora": True})
    with pytest.raises(AdapterPreflightError, match="DoRA"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_broken_config_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterPreflightError, match=r"adapter_config\.json: not valid JSON"):
        preflight_adapter(path, adapters_root=tmp_path / "root")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterPreflightError, match="not 'LORA'"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


# --- checks against the served base model ------------------------------------------------------------

HIDDEN, INTER, VOCAB, LAYERS = 128, 256, 512, 2


def write_fake_base(
    directory: Path, *, hidden: int = HIDDEN, layers: int = LAYERS, arch: str = "LlamaForCausalLM"
) -> Path:
    """A base model directory as vLLM reads it: config.json and a safetensors file (zeros)."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [arch],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "lm_head.weight": (VOCAB, hidden)}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (INTER, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (INTER, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, INTER)
    save_file(
        {k: np.zeros(v, dtype=np.float32) for k, v in shapes.items()}, str(directory / "model.safetensors")
    )
    return directory


def write_tensors(adapter: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {k: np.zeros(v, dtype=np.float32) for k, v in shapes.items()},
        str(adapter / "adapter_model.safetensors"),
    )


@pytest.fixture
def base(tmp_path: Path) -> BaseModelFacts:
    facts = load_base_model(str(write_fake_base(tmp_path / "base")), served_names=("demo-base",))
    assert facts is not None
    return facts


def _adapter(tmp_path: Path, **config: object) -> Path:
    return write_fake_adapter(tmp_path / "root" / "bot" / "v1", extra_config=dict(config))


def _preflight(path: Path, tmp_path: Path, base: BaseModelFacts | None) -> None:
    preflight_adapter(path, adapters_root=tmp_path / "root", max_lora_rank=8, base=base)


def test_an_adapter_made_for_the_served_base_passes(tmp_path: Path, base: BaseModelFacts) -> None:
    path = _adapter(tmp_path, base_model_name_or_path=str(base.directory))
    prefix = "base_model.model.model.layers"
    write_tensors(
        path,
        {
            f"{prefix}.0.self_attn.q_proj.lora_A.weight": (8, HIDDEN),
            f"{prefix}.0.self_attn.q_proj.lora_B.weight": (HIDDEN, 8),
            f"{prefix}.1.mlp.down_proj.lora_A.weight": (8, INTER),
            f"{prefix}.1.mlp.down_proj.lora_B.weight": (HIDDEN, 8),
            "base_model.model.model.embed_tokens.lora_embedding_A": (8, VOCAB),
            "base_model.model.model.embed_tokens.lora_embedding_B": (HIDDEN, 8),
        },
    )
    _preflight(path, tmp_path, base)
    # by served name, by a hub id that is not here (structure decides), by a regex over module names
    for named in ("demo-base", "someorg/not-cached-here"):
        (path / "adapter_config.json").write_text(
            json.dumps(
                {**json.loads((path / "adapter_config.json").read_text()), "base_model_name_or_path": named}
            )
        )
        _preflight(path, tmp_path, base)
    regex = _adapter(tmp_path, target_modules=r".*\.(q_proj|down_proj)")
    _preflight(regex, tmp_path, base)


def test_the_same_base_under_another_path_passes_and_another_model_is_refused(
    tmp_path: Path, base: BaseModelFacts
) -> None:
    copy = write_fake_base(tmp_path / "elsewhere" / "same-base")
    _preflight(_adapter(tmp_path, base_model_name_or_path=str(copy)), tmp_path, base)
    other = write_fake_base(tmp_path / "elsewhere" / "bigger", hidden=256, layers=4)
    path = _adapter(tmp_path, base_model_name_or_path=str(other))
    with pytest.raises(AdapterPreflightError, match="wrong base model") as err:
        _preflight(path, tmp_path, base)
    assert "hidden_size 256 vs 128" in err.value.message and "num_hidden_layers 4 vs 2" in err.value.message
    assert err.value.hint and str(base.directory) in err.value.hint


def test_weights_that_do_not_fit_the_base_shapes_are_a_wrong_base(
    tmp_path: Path, base: BaseModelFacts
) -> None:
    path = _adapter(tmp_path)
    write_tensors(path, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 64)})
    with pytest.raises(AdapterPreflightError, match=r"wrong base model: .*shape \[8, 64\].*\[128, 128\]"):
        _preflight(path, tmp_path, base)
    write_tensors(path, {"base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": (999, 8)})
    with pytest.raises(AdapterPreflightError, match="expected 256 on axis 0"):
        _preflight(path, tmp_path, base)


def test_target_modules_absent_from_the_base_are_refused(tmp_path: Path, base: BaseModelFacts) -> None:
    path = _adapter(tmp_path, target_modules=["c_attn", "q_proj"])
    with pytest.raises(AdapterPreflightError, match=r"target_modules \['c_attn'\] are not modules of"):
        _preflight(path, tmp_path, base)
    _preflight(path, tmp_path, None)  # without a served base (registration) this cannot be known
    with pytest.raises(AdapterPreflightError, match="matches no module"):
        _preflight(_adapter(tmp_path, target_modules=r".*\.c_attn"), tmp_path, base)
    deeper = _adapter(tmp_path)
    write_tensors(deeper, {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": (8, HIDDEN)})
    with pytest.raises(
        AdapterPreflightError, match=r"model\.layers\.7\.self_attn\.q_proj, which the served base"
    ):
        _preflight(deeper, tmp_path, base)


def test_modules_to_save_vllm_cannot_serve_are_refused(tmp_path: Path, base: BaseModelFacts) -> None:
    with pytest.raises(AdapterPreflightError, match=r"modules_to_save \['lm_head', 'embed_tokens'\]") as err:
        _preflight(_adapter(tmp_path, modules_to_save=["lm_head", "embed_tokens"]), tmp_path, None)
    assert err.value.hint and "merge" in err.value.hint
    classifier = _adapter(tmp_path, modules_to_save=["classifier"])
    with pytest.raises(AdapterPreflightError, match="needs a classification model"):
        _preflight(classifier, tmp_path, base)
    seq_cls = load_base_model(str(write_fake_base(tmp_path / "cls", arch="LlamaForSequenceClassification")))
    _preflight(classifier, tmp_path, seq_cls)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lora_bias": True}, "LoRA bias"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"use_qalora": True}, "QALoRA"),
        ({"use_bdlora": {"nblocks": 2}}, "block-diagonal"),
        ({"lora_alpha": None}, "missing lora_alpha"),
        ({"target_modules": []}, "missing target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "ranks must be positive"),
    ],
)
def test_peft_features_vllm_rejects_are_refused_first(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    with pytest.raises(AdapterPreflightError, match=re.escape(message)):
        _preflight(_adapter(tmp_path, **config), tmp_path, None)


def test_inits_vllm_accepts_pass(tmp_path: Path) -> None:
    _preflight(_adapter(tmp_path, init_lora_weights="gaussian"), tmp_path, None)


def test_a_damaged_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(AdapterPreflightError, match="not a valid safetensors file"):
        _preflight(path, tmp_path, None)


def test_a_base_that_cannot_be_read_here_is_none(tmp_path: Path) -> None:
    assert load_base_model("someorg/not-in-the-cache") is None
    assert load_base_model(str(tmp_path / "missing")) is None
