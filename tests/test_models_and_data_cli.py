"""``loraplane models pull`` and ``loraplane data push`` from the command line, where no cluster is
needed: refusals come before any pod (bad data, a bad reference) and ``models pull --local`` fetches
from a real hub endpoint (tests/hub_server.py). The cluster paths run in the walk on the real node
(tests/test_cluster_walk.py, step 2)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer

from loraplane.common.errors import InvalidInputError
from loraplane.platform.data_push import dataset_name, destination

LORAPLANE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "loraplane"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LORAPLANE), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def no_cluster(tmp_path: Path) -> dict[str, str]:
    """The kubernetes registry with a kubeconfig that does not exist: any Kubernetes call is exit 1."""
    return {
        **os.environ,
        "LORAPLANE_HOME": str(tmp_path / "home"),
        "LORAPLANE_REGISTRY": "kubernetes",
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        "NO_COLOR": "1",
    }


def test_bad_data_is_refused_with_the_trainers_reasons_before_anything_is_uploaded(
    demo_model: Path, tmp_path: Path, no_cluster: dict[str, str]
) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    done = _cli("data", "push", str(bad), "-m", str(demo_model), env=no_cluster)
    assert done.returncode == 2, done.stderr
    assert "is not usable for training; nothing was uploaded" in done.stderr
    assert "not_json (not valid JSON): 1 line (line 2)" in done.stderr
    assert "kubeconfig" not in done.stderr, "refused before any Kubernetes call"


def _preference_file(path: Path, *bad_rows: tuple[int, dict[str, object]]) -> Path:
    """The DPO tests' sentiment pairs (trl's prompt/chosen/rejected), with ``bad_rows`` put at lines."""
    from test_dpo import TRAIN_PAIRS, _trl_rows, _write

    rows: list[object] = list(_trl_rows(TRAIN_PAIRS[:12]))
    for line, row in bad_rows:
        rows.insert(line - 1, row)
    return _write(path, rows)


def test_bad_preference_data_is_refused_naming_line_and_class_before_anything_is_uploaded(
    demo_model: Path, tmp_path: Path, no_cluster: dict[str, str]
) -> None:
    pair = {"prompt": "Is it good?", "chosen": "yes", "rejected": "yes"}
    bad = _preference_file(tmp_path / "prefs.jsonl", (3, pair), (5, {"prompt": "Is it?", "chosen": "no"}))
    done = _cli("data", "push", str(bad), "-m", str(demo_model), "--method", "dpo", env=no_cluster)
    assert done.returncode == 2, done.stderr
    assert (
        "is not usable for training as preference pairs (--method dpo); nothing was uploaded" in done.stderr
    )
    assert "identical_pair" in done.stderr and "(line 3)" in done.stderr, done.stderr
    assert "missing_preference" in done.stderr and "(line 5)" in done.stderr, done.stderr
    assert "kubeconfig" not in done.stderr, "refused before any Kubernetes call"
    # OpenAI's preference format, named by --format (which implies --method dpo)
    reply_is_user = {
        "input": {"messages": [{"role": "user", "content": "Is it good?"}]},
        "preferred_output": [{"role": "user", "content": "yes"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }
    openai = _preference_file(tmp_path / "openai.jsonl", (2, reply_is_user))
    openai_format = ("--format", "openai_preference")
    done = _cli("data", "push", str(openai), "-m", str(demo_model), *openai_format, env=no_cluster)
    assert done.returncode == 2 and "unknown_role" in done.stderr and "(line 2)" in done.stderr, done.stderr
    assert "kubeconfig" not in done.stderr


def test_preference_pairs_pushed_as_supervised_data_say_to_use_method_dpo(
    demo_model: Path, tmp_path: Path, no_cluster: dict[str, str]
) -> None:
    prefs = _preference_file(tmp_path / "prefs.jsonl")
    done = _cli("data", "push", str(prefs), "-m", str(demo_model), env=no_cluster)
    assert done.returncode == 2, done.stderr
    assert "is not usable for training; nothing was uploaded" in done.stderr
    assert "push them for DPO runs with --method dpo" in done.stderr, done.stderr
    sft_format = ("--method", "sft", "--format", "preference")
    wrong = _cli("data", "push", str(prefs), "-m", str(demo_model), *sft_format, env=no_cluster)
    assert wrong.returncode == 2 and "preference data is checked with --method dpo" in wrong.stderr
    # the right method passes the checks and goes on to the cluster (none here: exit 1, nothing pushed)
    right = _cli("data", "push", str(prefs), "-m", str(demo_model), "--method", "dpo", env=no_cluster)
    assert right.returncode == 1 and "not usable" not in right.stderr, right.stderr


def test_dataset_names_are_labels_and_paths_name_the_content() -> None:
    assert dataset_name(Path("Support Chats.v2.jsonl"), None) == "support-chats-v2"
    assert dataset_name(Path("x.jsonl"), "support") == "support"
    with pytest.raises(InvalidInputError, match="--name 'Bad/Name': not a dataset name"):
        dataset_name(Path("x.jsonl"), "Bad/Name")
    assert destination("support", "ab" * 32, ".jsonl") == f"datasets/support/sha256-{'ab' * 32}.jsonl"


@pytest.fixture(scope="module")
def hub(demo_model: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("demo/tiny", demo_model)
        yield server


def test_models_pull_local_fetches_once_and_a_wrong_id_exits_2(
    hub: HubServer, demo_model: Path, tmp_path: Path, no_cluster: dict[str, str]
) -> None:
    env = {**no_cluster, "HF_ENDPOINT": hub.url, "LORAPLANE_MODELS_ROOT": str(tmp_path / "models")}
    done = _cli("models", "pull", "hf://demo/tiny", "--local", "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fetched"] and result["path"] == str(tmp_path / "models" / "demo--tiny@main")
    assert (Path(result["path"]) / "config.json").read_bytes() == (demo_model / "config.json").read_bytes()
    again = _cli("models", "pull", "hf://demo/tiny@main", "--local", env=env)
    assert again.returncode == 0 and "already there: hf://demo/tiny@main" in again.stdout, again.stdout
    wrong = _cli("models", "pull", "hf://demo/nope", "--local", env=env)
    assert wrong.returncode == 2 and "MODEL: no repository 'demo/nope'" in wrong.stderr, wrong.stderr


def test_models_pull_refuses_a_bad_reference_before_any_pod(no_cluster: dict[str, str]) -> None:
    done = _cli("models", "pull", "hf://not-a-repo-id", env=no_cluster)
    assert done.returncode == 2 and "does not name a hub repository" in done.stderr, done.stderr
    assert "kubeconfig" not in done.stderr
