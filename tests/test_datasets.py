"""Bad datasets get errors naming the file and line, and nothing is trained or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplane.common.jsonl import DatasetError
from loraplane.evals.dataset import load_eval_set
from loraplane.trainer.config import BaseModelSpec, DatasetSpec, load_config
from loraplane.trainer.data import load_tokenizer, prepare_datasets
from loraplane.trainer.train import train_and_publish

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "kind", "message"),
    [
        ('{"messages": [', "not_json", "not valid JSON"),
        ("[1, 2]", "not_object", "expected a JSON object, got array"),
        ('{"text": "no messages"}', "missing_messages", "no recognizable example"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown_role", "messages[0].role is 'robot'"),
        (
            '{"messages": [{"role": "user", "content": "  "}]}',
            "empty_content",
            "messages[0].content is empty",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn", "no assistant message"),
    ],
)
def test_bad_line_is_named_with_file_and_line_number(
    tmp_path: Path, demo_model: Path, bad_line: str, kind: str, message: str
) -> None:
    path = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), bad_line])
    tokenizer = load_tokenizer(BaseModelSpec(path=str(demo_model)))
    with pytest.raises(DatasetError) as info:
        prepare_datasets(
            DatasetSpec(path=path, min_examples=2),
            tokenizer,
            max_seq_length=128,
            assistant_only_loss=True,
            seed=0,
        )
    assert f"{path}:4: {message}" in str(info.value)
    assert f"{kind} (" in str(info.value)


def test_good_file_loads_every_conversation(tmp_path: Path, demo_model: Path) -> None:
    path = _write(tmp_path / "train.jsonl", [json.dumps(GOOD)] * 3)
    tokenizer = load_tokenizer(BaseModelSpec(path=str(demo_model)))
    prepared = prepare_datasets(
        DatasetSpec(path=path, min_examples=3),
        tokenizer,
        max_seq_length=128,
        assistant_only_loss=True,
        seed=0,
    )
    assert [e.row for e in prepared.train.usable] == [1, 2, 3]
    assert prepared.eval is None


def test_eval_set_needs_expected_answer(tmp_path: Path) -> None:
    path = _write(tmp_path / "eval.jsonl", ['{"prompt": "2+2?", "expected": "4"}', '{"prompt": "3+3?"}'])
    with pytest.raises(DatasetError, match=r"eval.jsonl:2: missing 'expected'"):
        load_eval_set(path)


def test_training_on_a_bad_dataset_writes_nothing(tmp_path: Path, demo_model: Path) -> None:
    data = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), "not json"])
    adapters = tmp_path / "adapters"
    cfg = load_config(
        None,
        [
            f"base_model.path={demo_model}",
            f"dataset.path={data}",
            f"output.adapters_root={adapters}",
            "output.name=bot",
        ],
    )
    with pytest.raises(DatasetError, match=r"train.jsonl:2: not valid JSON"):
        train_and_publish(cfg)
    assert not adapters.exists() or not any(adapters.rglob("*"))
