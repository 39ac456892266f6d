"""The trainer's data pipeline and ``loraplane data validate``: formats, masks, error classes, reports.

Everything runs on the demo model's real tokenizer and chat template
(``<|role|>\\n{content}<|end|>\\n``); nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from loraplane.common.errors import InvalidInputError
from loraplane.common.jsonl import DatasetError
from loraplane.platform.cli import app
from loraplane.trainer.chat_format import normalize_row
from loraplane.trainer.config import BaseModelSpec, DatasetSpec
from loraplane.trainer.data import PreparedData, load_tokenizer, prepare_datasets, validate_dataset
from loraplane.trainer.data_errors import ERROR_CLASSES, RowProblem
from loraplane.trainer.demo_model import CHAT_TEMPLATE

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
LONG = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}


def _chat(*turns: tuple[str, str], **weights: int) -> dict[str, Any]:
    """``_chat(("user", "hi"), ("assistant", "yo"), w1=0)``: weight 0 on message 1."""
    messages: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in turns]
    for key, w in weights.items():
        messages[int(key[1:])]["weight"] = w
    return {"messages": messages}


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    return load_tokenizer(BaseModelSpec(path=str(demo_model)))


def _validate(
    tokenizer: Any, max_seq_length: int = 128, all_tokens: bool = False, **spec: Any
) -> PreparedData:
    return validate_dataset(
        DatasetSpec(**spec),
        tokenizer,
        max_seq_length=max_seq_length,
        assistant_only_loss=not all_tokens,
        seed=0,
    )


def _trained_text(tokenizer: Any, labels: list[int]) -> str:
    return str(tokenizer.decode([t for t in labels if t != -100]))


# --- the acceptance matrix: one bad file per error class, through the CLI ---------------------------

GOOD_LINE = json.dumps(GOOD)

# name -> (file bytes, error class, line it is reported at)
MATRIX: dict[str, tuple[bytes, str, int]] = {
    "not_json": (b"\n".join([GOOD_LINE.encode()] * 10 + [b'{"messages": [']) + b"\n", "not_json", 11),
    "not_object": (("\n".join([GOOD_LINE] * 10 + ["[1, 2]"]) + "\n").encode(), "not_object", 11),
    "missing_messages": (
        ("\n".join([GOOD_LINE] * 10 + ['{"text": "no messages"}']) + "\n").encode(),
        "missing_messages",
        11,
    ),
    "unknown_role": (
        (
            "\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("robot", "x"), ("assistant", "y")))]) + "\n"
        ).encode(),
        "unknown_role",
        11,
    ),
    "empty_content": (
        (
            "\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("user", "  "), ("assistant", "y")))]) + "\n"
        ).encode(),
        "empty_content",
        11,
    ),
    "no_assistant_turn": (
        ("\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("user", "hi")))]) + "\n").encode(),
        "no_assistant_turn",
        11,
    ),
    "bad_role_order": (
        (
            "\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("assistant", "a"), ("user", "b")))]) + "\n"
        ).encode(),
        "bad_role_order",
        11,
    ),
    "bad_weight": (
        (
            "\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("user", "a"), ("assistant", "b"), w1=2))]) + "\n"
        ).encode(),
        "bad_weight",
        11,
    ),
    "unknown_key": (
        (
            "\n".join([GOOD_LINE] * 10 + ['{"messages": [{"role": "user", "content": "a", "wieght": 0}]}'])
            + "\n"
        ).encode(),
        "unknown_key",
        11,
    ),
    "over_length": (("\n".join([GOOD_LINE] * 10 + [json.dumps(LONG)]) + "\n").encode(), "over_length", 11),
    "zero_trainable_tokens": (
        (
            "\n".join([GOOD_LINE] * 10 + [json.dumps(_chat(("user", "a"), ("assistant", "b"), w1=0))]) + "\n"
        ).encode(),
        "zero_trainable_tokens",
        11,
    ),
    "blank_lines_keep_numbering": (
        ("\n".join([GOOD_LINE] * 5 + ["", "   "] + [GOOD_LINE] * 5 + ["nope"]) + "\n").encode(),
        "not_json",
        13,
    ),
    "bom": (b"\xef\xbb\xbf" + ("\n".join([GOOD_LINE] * 10) + "\n").encode(), "utf8_bom", 1),
    "utf16": ("\n".join([GOOD_LINE] * 10).encode("utf-16"), "invalid_utf8", 1),
    "invalid_utf8": (
        ("\n".join([GOOD_LINE] * 10) + "\n").encode() + b'{"messages": "\xff\xfe"}\n',
        "invalid_utf8",
        11,
    ),
    "empty_file": (b"", "empty_file", 1),
    "only_blank_lines": (b"\n  \n\n", "empty_file", 1),
    "json_array_file": (json.dumps([GOOD] * 12).encode(), "json_array_file", 1),
    "json_array_pretty": (b"\n" + json.dumps([GOOD] * 12, indent=2).encode(), "json_array_file", 2),
    "one_pretty_object": (json.dumps(GOOD, indent=2).encode(), "not_json", 1),
}


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["data", "validate", *args])


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_file_matrix_through_the_cli(
    case: str, tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, kind, line = MATRIX[case]
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    monkeypatch.setenv("LORAPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAPLANE_ADAPTERS_ROOT", str(tmp_path / "adapters"))
    before = _tree(tmp_path)

    result = _cli(str(path), "--base-model", str(demo_model), "--max-seq-length", "64", "-o", "json")

    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    errors = report["train"]["errors"]
    assert kind in errors, errors
    assert errors[kind]["first_lines"][0] == line
    assert errors[kind]["example"].startswith(f"{path}:{line}: ")
    assert any(f.startswith(f"train: {kind}") for f in report["failures"])
    assert "not usable for training" in " ".join(result.stderr.split())
    assert _tree(tmp_path) == before  # nothing written: no adapter, no registry, no cache
    assert not (tmp_path / "adapters").exists()

    text = _cli(str(path), "--base-model", str(demo_model), "--max-seq-length", "64")
    assert text.exit_code == 2
    assert f"{path}:{line}: " in text.stdout
    assert kind in text.stdout


def test_every_row_level_class_is_in_the_matrix() -> None:
    covered = {kind for _, kind, _ in MATRIX.values()}
    untested_here = {"unreadable", "template_error"}  # tested below, with their own setup
    untested_here |= {"missing_preference", "identical_pair"}  # preference data: tests/test_dpo.py
    assert set(ERROR_CLASSES) - untested_here <= covered


def test_good_file_passes_with_exit_0_and_report(tmp_path: Path, demo_model: Path) -> None:
    path = _jsonl(tmp_path / "train.jsonl", [GOOD] * 12)
    result = _cli(str(path), "--base-model", str(demo_model))
    assert result.exit_code == 0, result.output
    assert "rows read          12" in result.stdout
    assert "usable             12" in result.stdout
    assert "errors             none" in result.stdout
    assert "tokens per epoch   180 (trained: 72)" in result.stdout
    assert "verdict            OK" in result.stdout


def test_missing_file_and_bad_options_exit_2(tmp_path: Path, demo_model: Path) -> None:
    missing = _cli(str(tmp_path / "nope.jsonl"), "--base-model", str(demo_model), "-o", "json")
    assert missing.exit_code == 2
    assert json.loads(missing.stdout)["train"]["errors"]["unreadable"]["example"].endswith("no such file")
    bad = _cli(str(tmp_path / "x.csv"), "--base-model", str(demo_model))
    assert bad.exit_code == 2
    assert "neither .jsonl nor .parquet" in " ".join(bad.stderr.split())
    no_model = _cli(str(tmp_path / "x.jsonl"), "--base-model", str(tmp_path / "no-model"))
    assert no_model.exit_code == 2
    assert "base_model.path: cannot load a tokenizer" in " ".join(no_model.stderr.split())


# --- formats and labels ------------------------------------------------------------------------------


def test_chat_labels_cover_exactly_the_assistant_reply(tokenizer: Any, tmp_path: Path) -> None:
    row = _chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello there"))
    report = _validate(tokenizer, path=_jsonl(tmp_path / "t.jsonl", [row]), min_examples=1).train
    (example,) = report.usable
    assert len(example.labels) == len(example.input_ids)
    assert tokenizer.decode(example.input_ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n" + (
        "<|assistant|>\nhello there<|end|>\n"
    )
    assert _trained_text(tokenizer, example.labels) == "hello there<|end|>"
    # Trained tokens are one contiguous run: the reply and its end marker, not the newline after it.
    first = next(i for i, t in enumerate(example.labels) if t != -100)
    assert example.labels[first:-1] == example.input_ids[first:-1]
    assert example.labels[-1] == -100 and tokenizer.decode(example.input_ids[-1:]) == "\n"


def test_multi_turn_trains_every_reply_and_weight_0_is_context(tokenizer: Any, tmp_path: Path) -> None:
    turns = (("user", "one"), ("assistant", "first reply"), ("user", "two"), ("assistant", "second reply"))
    path = _jsonl(tmp_path / "t.jsonl", [_chat(*turns), _chat(*turns, w1=0), _chat(*turns, w1=1, w3=1)])
    a, b, c = _validate(tokenizer, path=path, min_examples=1).train.usable
    assert _trained_text(tokenizer, a.labels) == "first reply<|end|>second reply<|end|>"
    assert _trained_text(tokenizer, b.labels) == "second reply<|end|>"
    assert c.labels == a.labels


def test_all_tokens_trains_everything_but_weight_0_replies(tokenizer: Any, tmp_path: Path) -> None:
    turns = (("user", "one"), ("assistant", "first reply"), ("user", "two"), ("assistant", "second reply"))
    path = _jsonl(tmp_path / "t.jsonl", [_chat(*turns), _chat(*turns, w1=0)])
    plain, weighted = _validate(tokenizer, path=path, min_examples=1, all_tokens=True).train.usable
    assert plain.labels == plain.input_ids
    assert "first reply" not in _trained_text(tokenizer, weighted.labels)
    assert _trained_text(tokenizer, weighted.labels).startswith("<|user|>\none<|end|>\n<|assistant|>\n")


def test_prompt_completion_and_alpaca_rows(tokenizer: Any, tmp_path: Path) -> None:
    rows = [
        {"prompt": "Capital of France?", "completion": "Paris", "id": 7},
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate."},
        {"instruction": "Say yes", "input": "", "output": "yes"},
    ]
    pc, alpaca, no_input = _validate(
        tokenizer, path=_jsonl(tmp_path / "t.jsonl", rows), min_examples=1
    ).train.usable
    assert (
        tokenizer.decode(pc.input_ids) == "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis<|end|>\n"
    )
    assert _trained_text(tokenizer, pc.labels) == "Paris<|end|>"
    assert tokenizer.decode(alpaca.input_ids).startswith(
        "<|system|>\nYou translate.<|end|>\n<|user|>\nTranslate\n\nchat<|end|>"
    )
    assert _trained_text(tokenizer, alpaca.labels) == "cat<|end|>"
    assert "<|user|>\nSay yes<|end|>" in tokenizer.decode(no_input.input_ids)


def test_explicit_format_rejects_rows_of_another_shape(tokenizer: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, {"prompt": "p", "completion": "c"}])
    report = _validate(tokenizer, path=path, min_examples=1, format="prompt_completion").train
    assert [e.row for e in report.usable] == [2]
    assert report.errors["missing_messages"].first_lines == [1]
    assert "dataset.format is 'prompt_completion'" in report.errors["missing_messages"].example


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (
            [("user", "a"), ("assistant", "b"), ("system", "c"), ("user", "d"), ("assistant", "e")],
            "only the first",
        ),
        ([("user", "a"), ("user", "b"), ("assistant", "c")], "both user messages"),
        ([("user", "a"), ("assistant", "b"), ("assistant", "c")], "both assistant messages"),
        ([("system", "s"), ("assistant", "b"), ("user", "c"), ("assistant", "d")], "starts with the user"),
        ([("user", "a"), ("assistant", "b"), ("user", "c")], "end with the assistant's reply"),
    ],
)
def test_bad_role_orders(messages: list[tuple[str, str]], fragment: str) -> None:
    with pytest.raises(RowProblem) as info:
        normalize_row(_chat(*messages))
    assert info.value.kind == "bad_role_order"
    assert fragment in info.value.message


def test_message_details() -> None:
    ok = normalize_row(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "bob",
                },
                {"role": "assistant", "content": "c", "weight": None},
            ]
        }
    )
    assert [t.content for t in ok] == ["ab", "c"]
    for row, kind in [
        (_chat(("user", "a"), ("assistant", "b"), w0=1), "bad_weight"),
        (_chat(("user", "a"), ("assistant", "b"), w1=True), "bad_weight"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
            "empty_content",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": []}]},
            "unknown_key",
        ),
        ({"messages": [{"role": "tool", "content": "a"}]}, "unknown_role"),
        ({"messages": []}, "missing_messages"),
        ({"messages": "hi"}, "missing_messages"),
        ({"prompt": "p", "completion": ""}, "empty_content"),
        ({"instruction": "i", "input": 5, "output": "o"}, "empty_content"),
    ]:
        with pytest.raises(RowProblem) as info:
            normalize_row(row)
        assert info.value.kind == kind, row


# --- thresholds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "ok"), [(0.1, True), (0.05, False)])
def test_over_length_share_threshold(tokenizer: Any, tmp_path: Path, share: float, ok: bool) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [GOOD] * 10 + [LONG])  # 1 of 11 rows = 9.1%
    prepared = _validate(tokenizer, max_seq_length=64, path=path, max_overlength_share=share)
    assert len(prepared.train.usable) == 10  # the long row is dropped, never truncated
    assert prepared.train.errors["over_length"].first_lines == [11]
    assert (prepared.failures() == []) is ok


def test_fewer_than_min_examples_fails(tokenizer: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [GOOD] * 9)
    assert _validate(tokenizer, path=path).failures() == [
        "train: only 9 usable examples; at least 10 needed (dataset.min_examples)"
    ]
    assert _validate(tokenizer, path=path, min_examples=9).failures() == []


def test_prepare_raises_with_the_whole_report(tokenizer: Any, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, "not json", {"x": 1}, "not json either"])
    with pytest.raises(DatasetError) as info:
        prepare_datasets(
            DatasetSpec(path=path), tokenizer, max_seq_length=128, assistant_only_loss=True, seed=0
        )
    text = str(info.value)
    assert info.value.exit_code == 2
    assert f"{path}:2: not valid JSON" in text
    assert "not_json (not valid JSON): 2 lines (lines 2, 4)" in text
    assert "missing_messages (no recognizable example): 1 line (line 3)" in text
    assert "only 1 usable example; at least 10 needed" in text
    assert "rows read          4" in text


def test_report_text_and_dict(tokenizer: Any, tmp_path: Path) -> None:
    rows: list[Any] = [GOOD] * 11 + ["x"] * 7 + [_chat(("user", "a"))]
    prepared = _validate(tokenizer, path=_jsonl(tmp_path / "t.jsonl", rows))
    text = prepared.to_text()
    assert "errors             8 lines in 2 classes" in text
    assert "not_json           7  lines 12, 13, 14, 15, 16, ...  not valid JSON" in text
    assert "no_assistant_turn  1  line 19" in text
    assert "tokens per row     min 15  mean 15.0  p50 15  p90 15  p99 15  max 15" in text
    assert "tokens per epoch   165 (trained: 66)" in text
    assert "verdict            FAIL" in text
    d = prepared.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["train"]["errors"]["not_json"]["count"] == 7
    assert d["train"]["token_lengths"]["p50"] == 15


# --- tokenizer and template ----------------------------------------------------------------------------


def test_tokenizer_without_chat_template(demo_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare-model"
    shutil.copytree(demo_model, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(InvalidInputError, match="has no chat template") as info:
        load_tokenizer(BaseModelSpec(path=str(bare)))
    assert info.value.hint is not None and "base_model.chat_template" in info.value.hint
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    tokenizer = load_tokenizer(BaseModelSpec(path=str(bare), chat_template=template))
    path = _jsonl(tmp_path / "t.jsonl", [GOOD])
    (example,) = _validate(tokenizer, path=path, min_examples=1).train.usable
    assert _trained_text(tokenizer, example.labels) == "hello there<|end|>"


def test_template_that_is_not_prefix_stable_is_refused_once(demo_model: Path, tmp_path: Path) -> None:
    # The generation prompt differs from how a past assistant turn is rendered.
    template = tmp_path / "unstable.jinja"
    template.write_text(
        CHAT_TEMPLATE.replace("{{ '<|assistant|>\\n' }}{% endif %}", "{{ '<|assistant|> ' }}{% endif %}")
    )
    with pytest.raises(InvalidInputError, match="not prefix-stable") as info:
        load_tokenizer(BaseModelSpec(path=str(demo_model), chat_template=template))
    assert "base_model.chat_template" in str(info.value)


def test_template_refusing_a_row_is_a_row_error(demo_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "picky.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['content'] == 'forbidden' %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
    )
    tokenizer = load_tokenizer(BaseModelSpec(path=str(demo_model), chat_template=template))
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, _chat(("user", "forbidden"), ("assistant", "b"))])
    report = _validate(tokenizer, path=path, min_examples=1).train
    assert report.errors["template_error"].first_lines == [2]
    assert "no forbidden words" in report.errors["template_error"].example


# --- other sources, held-out data --------------------------------------------------------------------------


def test_parquet_file(tokenizer: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD] * 10 + [
        _chat(("user", "a"), ("assistant", "b"), w1=0),
        _chat(("user", "a"), ("assistant", "b"), w0=1),
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # weight becomes a nullable column of every message
    report = _validate(tokenizer, path=path).train
    assert report.unit == "row" and report.rows == 12 and len(report.usable) == 10
    assert report.errors["zero_trainable_tokens"].first_lines == [11]
    assert report.errors["bad_weight"].example.startswith(f"{path} row 12: ")
    assert _trained_text(tokenizer, report.usable[0].labels) == "hello there<|end|>"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert "unreadable" in _validate(tokenizer, path=broken).train.errors


def test_local_datasets_directory_as_hub(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data_dir = tmp_path / "my-chats"
    data_dir.mkdir()
    _jsonl(data_dir / "train.jsonl", [GOOD] * 10 + [_chat(("user", "a"))])
    _jsonl(data_dir / "test.jsonl", [GOOD] * 2)
    prepared = _validate(tokenizer, hub=str(data_dir), eval_split="test")
    assert prepared.train.source == f"hub:{data_dir}[train]"
    assert prepared.train.errors["no_assistant_turn"].first_lines == [11]
    assert prepared.eval is not None and len(prepared.eval.usable) == 2
    assert len(prepared.sha256) == 64 and prepared.sha256 != prepared.train.sha256
    assert _validate(tokenizer, hub=str(data_dir), eval_split="test").sha256 == prepared.sha256

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD] * 10).save_to_disk(str(saved))
    assert _validate(tokenizer, hub=str(saved)).failures() == []
    missing = _validate(tokenizer, hub=str(data_dir), split="validation")
    assert "unreadable" in missing.train.errors


def test_eval_file_and_eval_fraction(tokenizer: Any, tmp_path: Path) -> None:
    rows = [_chat(("user", f"question {i}"), ("assistant", f"answer {i}")) for i in range(20)]
    path = _jsonl(tmp_path / "t.jsonl", rows)

    def held_out(seed: int) -> list[int]:
        prepared = validate_dataset(
            DatasetSpec(path=path, eval_fraction=0.2),
            tokenizer,
            max_seq_length=64,
            assistant_only_loss=True,
            seed=seed,
        )
        assert prepared.eval is not None
        assert len(prepared.train.usable) == 16 and prepared.train.held_out == 4
        assert prepared.sha256 == prepared.train.sha256
        assert {e.row for e in prepared.train.usable}.isdisjoint(e.row for e in prepared.eval.usable)
        return [e.row for e in prepared.eval.usable]

    assert held_out(0) == held_out(0)
    assert held_out(0) != held_out(1)

    small = _validate(tokenizer, path=_jsonl(tmp_path / "s.jsonl", rows[:10]), eval_fraction=0.01)
    assert small.eval is not None and len(small.eval.usable) == 1  # at least one row
    assert small.failures() == [
        "train: only 9 usable examples after holding out 1 for evaluation; "
        "at least 10 needed (dataset.min_examples)"
    ]

    ev = _jsonl(tmp_path / "eval.jsonl", ["oops"])
    prepared = _validate(tokenizer, path=path, eval_path=ev)
    assert prepared.failures() == [
        "eval: not_json (not valid JSON): 1 line (line 1)",
        "eval: no usable evaluation example (at least 1 needed)",
    ]
