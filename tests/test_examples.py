"""examples/: the configs the docs point at load, validate and check their data, like torchtune's.

A key renamed in the config models, a metric dropped from the suite schema or a data format the
trainer stops reading fails here, not in a user's first run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.evals.suite import load_suite
from loraplane.trainer.config import load_config
from loraplane.trainer.data import load_tokenizer, validate_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("name", "method"), [("train.yaml", "sft"), ("train-dpo.yaml", "dpo")])
def test_each_training_example_validates_and_its_data_passes_the_trainers_checks(
    name: str, method: str, demo_model: Path
) -> None:
    config = load_config(EXAMPLES / name, [f"base_model.path={demo_model}"])
    assert config.method == method
    assert config.dataset.path is not None and config.dataset.path.is_file(), "relative to the file"
    prepared = validate_dataset(
        config.dataset,
        load_tokenizer(config.base_model),
        max_seq_length=config.training.max_seq_length,
        assistant_only_loss=method == "sft",
        seed=0,
        method=method,
    )
    assert not prepared.failures(), prepared.failures()
    assert len(prepared.train.usable) == prepared.train.rows == 12, "every row usable"


def test_the_dpo_example_starts_from_a_registered_sft_version() -> None:
    config = load_config(EXAMPLES / "train-dpo.yaml")
    assert config.base_adapter == "support-bot@v1"


def test_the_suite_example_loads_with_its_datasets_and_gate() -> None:
    loaded = load_suite(EXAMPLES / "suite.yaml")
    assert loaded.suite.name == "support-bot"
    assert [d.name for d in loaded.suite.datasets] == ["faq"]
    assert {k for rule in ("min_score", "beat_base") for k in getattr(loaded.suite.gate, rule)} == {
        "exact_match",
        "faq/exact_match",
    }
    path, examples = loaded.datasets["faq"]
    assert path == EXAMPLES / "data" / "eval.jsonl" and len(examples) == 4
