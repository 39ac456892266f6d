"""Every invalid training value is rejected before anything is loaded, naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.common.errors import ConfigError, InvalidInputError
from loraplane.trainer.config import load_config

BASE = [
    "base_model.path=some/model",
    "dataset.path=train.jsonl",
    "output.adapters_root=/tmp/a",
    "output.name=bot",
]


def test_overrides_build_a_valid_config() -> None:
    cfg = load_config(None, [*BASE, "lora.r=16", "training.epochs=3", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.r == 16
    assert cfg.training.epochs == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "field", "fix"),
    [
        ("lora.r=7", "lora.r", "use r=8"),
        ("lora.dropout=1.5", "lora.dropout", "less than 1"),
        ("training.learning_rate=-1", "training.learning_rate", "greater than 0"),
        ("output.name=Bad_Name", "output.name", "should match pattern"),
        ("training.max_steps=0", "training", "use -1"),
        ("training.epocs=3", "training.epocs", "unknown field"),
    ],
)
def test_bad_values_name_field_value_and_fix(override: str, field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, override])
    message = str(info.value)
    assert field in message
    assert fix in message


def test_missing_section_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"dataset: required field is missing"):
        load_config(None, ["base_model.path=m", "output.adapters_root=/a", "output.name=bot"])


def test_yaml_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg" / "train.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "base_model: {path: org/model}\ndataset: {path: data/train.jsonl}\n"
        "output: {adapters_root: out, name: bot}\n"
    )
    cfg = load_config(cfg_file)
    assert cfg.dataset.path == tmp_path / "cfg" / "data" / "train.jsonl"
    assert cfg.output.adapters_root == tmp_path / "cfg" / "out"
    assert cfg.base_model.path == "org/model"  # a hub id stays a hub id


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: not valid YAML"):
        load_config(cfg_file)


def test_next_version_counts_up_past_gaps_and_ignores_staging_dirs(tmp_path: Path) -> None:
    from loraplane.trainer.train import next_version

    root = tmp_path / "adapters"
    assert next_version(root, "bot") == "v1"
    (root / "bot" / "v1").mkdir(parents=True)
    (root / "bot" / "v7").mkdir()
    (root / "bot" / ".v8.staging-x").mkdir()  # an interrupted publish does not take a version
    assert next_version(root, "bot") == "v8"


def test_a_dataset_comes_from_exactly_one_source_and_a_pushed_name_needs_train_submit() -> None:
    from loraplane.trainer.config import DatasetSpec
    from loraplane.trainer.data import validate_dataset

    one = r"exactly one of dataset\.path .*, dataset\.hub, dataset\.url or dataset\.pushed"
    for sources in ({}, {"path": "/d/train.jsonl", "pushed": "support"}, {"hub": "org/x", "pushed": "s"}):
        with pytest.raises(ValueError, match=one):
            DatasetSpec.model_validate(sources)
    pushed = DatasetSpec.model_validate({"pushed": "support"})
    with pytest.raises(InvalidInputError, match="`loraplane train submit` resolves it") as err:
        validate_dataset(pushed, tokenizer=None, max_seq_length=64, assistant_only_loss=True, seed=0)
    assert "name the file in dataset.path" in str(err.value)
