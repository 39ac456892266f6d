"""``method: dpo``: preference data checks, and real DPO runs on the demo model that move its preferences.

The preference shift is measured here with transformers + peft directly (not with trl's logged
rewards): the summed log-probability of the chosen reply minus the rejected one, for the base model
(or the SFT adapter DPO started from) and for the published DPO adapter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_trainer_runs import _progress_steps  # the trainer tests' log reader
from typer.testing import CliRunner

from loraplane.common.errors import ConfigError
from loraplane.common.settings import Settings
from loraplane.platform.cli import app
from loraplane.trainer.__main__ import main as trainer_main
from loraplane.trainer.checkpoints import MARKER
from loraplane.trainer.config import BaseModelSpec, DatasetSpec, load_config
from loraplane.trainer.data import load_tokenizer, validate_dataset
from loraplane.trainer.demo_tasks import SENTIMENT, SYSTEM_PROMPT, write_task_files
from loraplane.trainer.exit_codes import PREEMPTED

DEADLINE_S = 240.0
Pair = tuple[list[dict[str, str]], str, str]  # prompt messages, chosen, rejected


def _pairs(templates: tuple[str, ...]) -> list[Pair]:
    """The sentiment task as preferences: the right label is chosen, the wrong one rejected."""
    pairs = []
    for template in templates:
        for word, answer in SENTIMENT.answers.items():
            wrong = "negative" if answer == "positive" else "positive"
            prompt = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": template.format(w=word)},
            ]
            pairs.append((prompt, answer, wrong))
    random.Random(0).shuffle(pairs)
    return pairs


TRAIN_PAIRS = _pairs(SENTIMENT.train_templates)
HELD_OUT_PAIRS = _pairs(SENTIMENT.eval_templates)  # sentence templates training never shows


def _write(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _trl_rows(pairs: list[Pair]) -> list[dict[str, Any]]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]


def _openai_rows(pairs: list[Pair]) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": p},
            "preferred_output": [{"role": "assistant", "content": c}],
            "non_preferred_output": [{"role": "assistant", "content": r}],
        }
        for p, c, r in pairs
    ]


def _config(work: Path, demo_model: Path, data: Path, *, max_steps: int = 30, **sections: Any) -> Path:
    tree: dict[str, Any] = {
        "method": "dpo",
        "base_model": {"path": str(demo_model)},
        "dataset": {"path": str(data)},
        "lora": {"r": 8, "alpha": 16},
        "training": {
            "learning_rate": 5e-3,
            "max_steps": max_steps,
            "batch_size": 8,
            "max_seq_length": 128,
            "logging_steps": 1,
            "seed": 3,
        },
        "dpo": {"beta": 0.1},
        "checkpoints": {"every_steps": None, "keep_last": 2},
        "output": {"adapters_root": str(work / "adapters"), "name": "pref", "run_dir": str(work / "run")},
    }
    for key, values in sections.items():
        if values is None:
            tree.pop(key, None)
        elif isinstance(values, dict):
            tree.setdefault(key, {}).update(values)
        else:
            tree[key] = values
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "LORAPLANE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **extra}


def _train(config: Path, **env: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "loraplane.trainer", "--config", str(config)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=DEADLINE_S,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _published(out: str) -> Path:
    return Path(json.loads(out.strip().splitlines()[-1])["adapter"])


def _margins(demo_model: Path, adapter: Path | None, *pair_sets: list[Pair]) -> list[list[float]]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair, summed over the reply's tokens (its
    end-of-turn marker included), under the base model or the base model with ``adapter``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    model: Any = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    def logp(prompt: list[dict[str, str]], reply: str) -> float:
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reply}], tokenize=False
        )
        assert full.startswith(head)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(head_ids)] == head_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        per_token = logprobs.gather(1, targets[:, None])[:, 0]
        return float(per_token[len(head_ids) - 1 :].sum())

    return [[logp(p, c) - logp(p, r) for p, c, r in pairs] for pairs in pair_sets]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- config ---------------------------------------------------------------------------------------


def test_method_defaults_to_sft_and_dpo_settings_are_checked(tmp_path: Path) -> None:
    data = _write(tmp_path / "pref.jsonl", _trl_rows(TRAIN_PAIRS[:12]))
    base = {"base_model": {"path": "m"}, "output": {"adapters_root": str(tmp_path), "name": "x"}}

    def load(**tree: Any) -> Any:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "dataset": {"path": str(data)}, **tree}))
        return load_config(path)

    sft = load()
    assert sft.method == "sft" and sft.base_adapter is None
    dpo = load(method="dpo", base_adapter="support-bot@v3", dpo={"beta": 0.2, "loss_type": "ipo"})
    assert (dpo.dpo.beta, dpo.dpo.loss_type, dpo.base_adapter) == (0.2, "ipo", "support-bot@v3")
    refusals = {
        "dpo: these settings apply to method: dpo": {"dpo": {"beta": 0.2}},
        "base_adapter: 'bot@v1' is supported with method: dpo only": {"base_adapter": "bot@v1"},
        "name an exact registered version, NAME@vN": {"method": "dpo", "base_adapter": "bot:prod"},
        "dataset.format: 'preference' is preference data; set method: dpo": {
            "dataset": {"path": str(data), "format": "preference"}
        },
        "dataset.format: 'chat' is supervised data": {
            "method": "dpo",
            "dataset": {"path": str(data), "format": "chat"},
        },
        "training.batching: 'packed' is not available with method: dpo": {
            "method": "dpo",
            "training": {"batching": "packed"},
        },
        "dpo.beta": {"method": "dpo", "dpo": {"beta": 0}},
        "dpo.loss_type": {"method": "dpo", "dpo": {"loss_type": "kto"}},
    }
    for message, tree in refusals.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load(**tree)


# --- data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    return load_tokenizer(BaseModelSpec(path=str(demo_model)))


def test_both_preference_formats_give_the_same_pairs_and_counts(tmp_path: Path, tokenizer: Any) -> None:
    pairs = TRAIN_PAIRS[:12]
    string_prompt = [
        {"system": p[0]["content"], "prompt": p[1]["content"], "chosen": c, "rejected": r}
        for p, c, r in pairs
    ]
    reports = {}
    for name, rows in {
        "trl": _trl_rows(pairs),
        "openai": _openai_rows(pairs),
        "strings": string_prompt,
    }.items():
        prepared = validate_dataset(
            DatasetSpec(path=_write(tmp_path / f"{name}.jsonl", rows)),
            tokenizer,
            max_seq_length=128,
            assistant_only_loss=True,
            seed=0,
            method="dpo",
        )
        assert prepared.failures() == [], prepared.to_text()
        reports[name] = prepared.train
    records = {name: [e.to_record() for e in r.usable] for name, r in reports.items()}  # type: ignore[attr-defined]
    assert records["trl"] == records["openai"] == records["strings"]
    assert records["trl"][0]["chosen"] == [{"role": "assistant", "content": pairs[0][1]}]
    trl = reports["trl"]
    # Both sequences of every pair are forwarded: the prompt twice, each reply once.
    assert trl.total_tokens == sum(
        2 * e.prompt_tokens + e.chosen_tokens + e.rejected_tokens for e in trl.usable
    )  # type: ignore[attr-defined]
    assert trl.trained_tokens == sum(e.chosen_tokens + e.rejected_tokens for e in trl.usable)  # type: ignore[attr-defined]


GOOD = _trl_rows(TRAIN_PAIRS[:12])
BAD_ROWS: dict[str, tuple[dict[str, Any], str, str]] = {
    # case: (row, error class, what the message names)
    "missing rejected": (
        {"prompt": "Is it good?", "chosen": "yes"},
        "missing_preference",
        "lacks 'rejected'",
    ),
    "empty chosen": (
        {"prompt": "Is it good?", "chosen": "  ", "rejected": "no"},
        "empty_content",
        "'chosen' is empty",
    ),
    "chosen == rejected": (
        {"prompt": "Is it good?", "chosen": "yes", "rejected": "yes"},
        "identical_pair",
        "'chosen' and 'rejected' are the same text",
    ),
    "wrong type": (
        {"prompt": "Is it good?", "chosen": "yes", "rejected": 7},
        "empty_content",
        "'rejected' must be text, got a number",
    ),
    "openai reply not assistant": (
        {
            "input": {"messages": [{"role": "user", "content": "Is it good?"}]},
            "preferred_output": [{"role": "user", "content": "yes"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        },
        "unknown_role",
        "'preferred_output'[0].role is 'user'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_preference_row_fails_with_exit_2_naming_line_and_field_before_training(
    case: str, tmp_path: Path, demo_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row, kind, names = BAD_ROWS[case]
    data = _write(tmp_path / "pref.jsonl", [*GOOD[:4], row, *GOOD[4:]])  # line 5
    config = _config(tmp_path, demo_model, data)
    assert trainer_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:5: " in err and names in err, err
    assert f"train: {kind}" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "adapters").exists(), "nothing trained"

    result = CliRunner().invoke(
        app, ["data", "validate", str(data), "-m", str(demo_model), "--method", "dpo", "-o", "json"]
    )
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)["train"]
    assert report["errors"][kind]["first_lines"] == [5]
    assert report["errors"][kind]["example"].startswith(f"{data}:5: ")
    assert names in report["errors"][kind]["example"]


def test_sft_data_given_to_dpo_is_refused_by_its_keys(tmp_path: Path, demo_model: Path) -> None:
    train, _ = write_task_files(SENTIMENT, tmp_path)
    result = CliRunner().invoke(
        app, ["data", "validate", str(train), "-m", str(demo_model), "--method", "dpo"]
    )
    assert result.exit_code == 2
    assert "missing_preference" in result.stdout and f"{train}:1: " in result.stdout
    assert "expected 'prompt' + 'chosen' + 'rejected'" in result.stdout


# --- training -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_dpo_moves_the_preference_toward_chosen_and_records_it(tmp_path: Path, demo_model: Path) -> None:
    data = _write(tmp_path / "pref.jsonl", _openai_rows(TRAIN_PAIRS))  # OpenAI's format, end to end
    code, out, err = _train(_config(tmp_path, demo_model, data))
    assert code == 0, err[-3000:]
    adapter = _published(out)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "manifest.json",
        "metrics.jsonl",
        "tensorboard",  # TensorBoard's event files (tracking.tensorboard, on by default)
    ]
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["method"] == "dpo"
    assert manifest["dpo"] == {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}
    assert manifest["base_adapter"] is None
    assert manifest["metrics"]["steps"] == 30
    assert manifest["dataset"]["examples"] == len(TRAIN_PAIRS)
    assert 0 <= manifest["metrics"]["final_reward_accuracy"] <= 1

    bases = _margins(demo_model, None, TRAIN_PAIRS, HELD_OUT_PAIRS)
    tuneds = _margins(demo_model, adapter, TRAIN_PAIRS, HELD_OUT_PAIRS)
    for base, tuned, name in zip(bases, tuneds, ("training", "held-out"), strict=True):
        shift = [t - b for t, b in zip(tuned, base, strict=True)]
        # A random tiny model has no preference; DPO must open a clear one, pair by pair.
        assert _mean(shift) > 2.0, f"{name}: mean shift {_mean(shift):.3f} nats"
        assert sum(s > 0 for s in shift) >= 0.9 * len(shift), f"{name}: {shift}"
        assert sum(t > 0 for t in tuned) >= 0.75 * len(tuned), f"{name}: chosen not preferred: {tuned}"


@pytest.mark.e2e
def test_sigterm_mid_dpo_run_checkpoints_and_the_rerun_resumes(tmp_path: Path, demo_model: Path) -> None:
    data = _write(tmp_path / "pref.jsonl", _trl_rows(TRAIN_PAIRS))
    config = _config(tmp_path, demo_model, data, max_steps=400)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.trainer", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        _progress_steps(proc, until=3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED, err[-3000:]
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / MARKER).is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 3 and f"stopped by SIGTERM at step {step}" in err
    assert not (tmp_path / "adapters" / "pref").exists(), "nothing published"

    # The same run directory with another method's data is another job: refused, not resumed.
    sft_data, _ = write_task_files(SENTIMENT, tmp_path / "sft")
    other = _config(tmp_path, demo_model, sft_data, max_steps=400, method="sft", dpo=None)
    code, _, err = _train(other)
    assert code == 2 and "refusing to resume" in err, err[-3000:]

    code, out, err = _train(_config(tmp_path, demo_model, data, max_steps=step + 2))
    assert code == 0, err[-3000:]
    assert "resuming from checkpoint" in err
    manifest = json.loads((_published(out) / "manifest.json").read_text())
    assert manifest["method"] == "dpo"
    assert manifest["metrics"]["resumed_from_step"] == step
    assert manifest["metrics"]["steps"] == step + 2
    assert not list((tmp_path / "run").glob("checkpoint-*")), "cleared once published"


@pytest.mark.e2e
def test_dpo_on_top_of_a_registered_sft_version(tmp_path: Path, demo_model: Path) -> None:
    from safetensors.torch import load_file

    from loraplane.platform.adapters import register_adapter
    from loraplane.registry.local import LocalRegistry

    # 1. An SFT adapter on the same task, registered like any trained adapter.
    sft_data, _ = write_task_files(SENTIMENT, tmp_path / "sft-data", repeats=1)
    sft_config = _config(
        tmp_path / "sft",
        demo_model,
        sft_data,
        max_steps=20,
        method="sft",
        dpo=None,
        output={
            "adapters_root": str(tmp_path / "adapters"),
            "name": "bot",
            "run_dir": str(tmp_path / "sft-run"),
        },
    )
    code, out, err = _train(sft_config)
    assert code == 0, err[-3000:]
    sft_adapter = _published(out)
    settings = Settings(
        home=tmp_path / "state", adapters_root=tmp_path / "adapters", server_url="http://127.0.0.1:9"
    )
    entry = register_adapter(settings, sft_adapter, on_warning=lambda _: None)
    assert entry.ref == "bot@v1"
    home = {"LORAPLANE_HOME": str(settings.home), "LORAPLANE_REGISTRY": "local"}

    # 2. An unknown version is refused before anything loads, naming the field.
    data = _write(tmp_path / "pref.jsonl", _trl_rows(TRAIN_PAIRS))
    output = {
        "adapters_root": str(tmp_path / "adapters"),
        "name": "bot-dpo",
        "run_dir": str(tmp_path / "run"),
    }
    code, _, err = _train(_config(tmp_path, demo_model, data, base_adapter="bot@v9", output=output), **home)
    assert code == 2 and "base_adapter: 'bot@v9' is not in the registry" in err, err[-3000:]
    assert not (tmp_path / "run").exists()

    # 3. DPO from bot@v1: its LoRA is the start and the reference; the lora section is left out.
    config = _config(tmp_path, demo_model, data, base_adapter="bot@v1", output=output)
    tree = yaml.safe_load(config.read_text())
    del tree["lora"]
    config.write_text(yaml.safe_dump(tree))
    code, out, err = _train(config, **home)
    assert code == 0, err[-3000:]
    dpo_adapter = _published(out)
    manifest = json.loads((dpo_adapter / "manifest.json").read_text())
    assert manifest["method"] == "dpo"
    registered = LocalRegistry(settings.home).read().resolve("bot@v1")
    assert manifest["base_adapter"]["ref"] == "bot@v1"
    assert manifest["base_adapter"]["weights_sha256"] == registered.weights_sha256
    assert manifest["base_adapter"]["method"] == "sft"
    sft_manifest = json.loads((sft_adapter / "manifest.json").read_text())
    assert manifest["base_adapter"]["run_id"] == sft_manifest["run_id"]
    assert manifest["lora"]["r"] == sft_manifest["lora"]["r"]

    sft_weights, dpo_weights = (
        load_file(str(sft_adapter / "adapter_model.safetensors")),
        load_file(str(dpo_adapter / "adapter_model.safetensors")),
    )
    assert sft_weights.keys() == dpo_weights.keys(), "the same LoRA, continued"
    assert any(not (sft_weights[k] == dpo_weights[k]).all() for k in sft_weights), "DPO changed it"

    # Measured against the SFT adapter it started from (DPO's reference), not only against the base.
    before, held_before = _margins(demo_model, sft_adapter, TRAIN_PAIRS, HELD_OUT_PAIRS)
    after, held_after = _margins(demo_model, dpo_adapter, TRAIN_PAIRS, HELD_OUT_PAIRS)
    assert _mean(after) - _mean(before) > 1.0, (_mean(before), _mean(after))
    assert _mean(held_after) > _mean(held_before), (_mean(held_before), _mean(held_after))
