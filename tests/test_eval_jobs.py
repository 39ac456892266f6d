"""What `loraplane evals submit` puts in the evaluation Job's ConfigMap, without a cluster: the suite
with its eval sets beside it, loaded back exactly as the pod loads it, and the size limit.
(The Job itself, on a live API server and with the real vLLM server: tests/test_eval_jobs_k8s.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loraplane.common.errors import InvalidInputError
from loraplane.evals.suite import load_suite, suite_for_dataset
from loraplane.platform.eval_jobs import MAX_CONFIGMAP_BYTES, SUITE_FILE, bundle_suite


def _eval_set(path: Path, rows: int, answer: str = "woof") -> Path:
    lines = [json.dumps({"prompt": f"question {i}?", "reference": answer}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_bundle_renames_the_eval_sets_inlines_a_schema_file_and_loads_back_the_same_suite(
    tmp_path: Path,
) -> None:
    (tmp_path / "sets").mkdir()
    _eval_set(tmp_path / "sets" / "faq.jsonl", 3)
    _eval_set(tmp_path / "tickets.jsonl", 2, answer='{"priority": "low"}')
    schema = {"type": "object", "required": ["priority"]}
    (tmp_path / "ticket.schema.json").write_text(json.dumps(schema))
    suite = {
        "name": "support",
        "datasets": [
            {"name": "faq", "path": "sets/faq.jsonl", "metrics": ["exact_match", "token_f1"]},
            {
                "name": "tickets",
                "path": str(tmp_path / "tickets.jsonl"),  # absolute works too
                "max_tokens": 64,
                "metrics": ["json_valid", {"name": "json_schema", "schema_file": "ticket.schema.json"}],
            },
        ],
        "gate": {"min_score": {"exact_match": 0.5, "tickets/json_schema": 0.9}},
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    loaded = load_suite(tmp_path / "suite.yaml")

    bundle = bundle_suite(loaded, "suite.yaml")

    assert set(bundle.files) == {SUITE_FILE, "eval-0.jsonl", "eval-1.jsonl"}
    assert bundle.files["eval-0.jsonl"] == (tmp_path / "sets" / "faq.jsonl").read_text()
    assert bundle.files["eval-1.jsonl"] == (tmp_path / "tickets.jsonl").read_text()
    carried = yaml.safe_load(bundle.files[SUITE_FILE])
    assert [d["path"] for d in carried["datasets"]] == ["eval-0.jsonl", "eval-1.jsonl"]
    assert carried["datasets"][1]["metrics"][1] == {"name": "json_schema", "schema": schema}
    assert carried["gate"]["min_score"] == {"exact_match": 0.5, "tickets/json_schema": 0.9}
    assert bundle.name == "support" and bundle.size == sum(
        len(k.encode()) + len(v.encode()) for k, v in bundle.files.items()
    )
    # The pod reads the ConfigMap's files from any directory: the same suite, the same sha256, which
    # is how `evals submit --wait` recognises the record the Job wrote.
    pod_dir = tmp_path / "mounted"
    pod_dir.mkdir()
    for key, text in bundle.files.items():
        (pod_dir / key).write_text(text)
    again = load_suite(pod_dir / SUITE_FILE)
    assert again.sha256 == bundle.sha256
    assert {name: len(rows) for name, (_, rows) in again.datasets.items()} == {"faq": 3, "tickets": 2}
    assert again.schemas["tickets"] == schema


def test_a_dataset_alone_is_carried_as_its_default_suite(tmp_path: Path) -> None:
    loaded = suite_for_dataset(_eval_set(tmp_path / "animals-eval.jsonl", 4))
    bundle = bundle_suite(loaded, "animals-eval.jsonl")
    carried = yaml.safe_load(bundle.files[SUITE_FILE])
    assert carried["name"] == "animals-eval" and carried["datasets"][0]["path"] == "eval-0.jsonl"
    assert carried["gate"]["beat_base"] == {"exact_match": 0.0}


def test_eval_sets_larger_than_a_configmap_are_refused_with_the_size_and_what_to_do(tmp_path: Path) -> None:
    rows = MAX_CONFIGMAP_BYTES // 40 + 10  # about 45 bytes a line
    loaded = suite_for_dataset(_eval_set(tmp_path / "big.jsonl", rows))
    with pytest.raises(InvalidInputError) as caught:
        bundle_suite(loaded, "big.jsonl")
    message = str(caught.value)
    assert "big.jsonl: the suite and its eval sets are" in message and "(1024 KiB)" in message
    assert "smaller held-out set" in message and "loraplane adapters eval REF" in message
