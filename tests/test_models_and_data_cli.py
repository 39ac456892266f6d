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
