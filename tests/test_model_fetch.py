"""Base models fetched from a hub endpoint and from an S3 API onto a models root (issue 20 item 1).

Real servers, real clients: huggingface_hub downloads from ``tests/hub_server.py`` (a local hub
endpoint: the hub itself cannot be reached from here) and boto3 from moto's S3 server
(``tests/s3_server.py``). What a user relies on: the model is renamed into
``<root>/<name>@<revision>/`` only when whole, a cut download resumes, a wrong id / missing token /
denied bucket is exit 2 with the value to fix and leaves nothing, and the trainer and vLLM's entry
point read the same directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from s3_server import S3Server

from loraplane.common.errors import ConfigError
from loraplane.common.model_fetch import (
    MARKER,
    ModelFetchError,
    ModelSourceUnavailable,
    fetch_error,
    fetch_model,
    staging_paths,
    wait_for_model,
)
from loraplane.common.model_ref import ModelRefError, parse_model_ref

CONFIG = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
WEIGHTS = os.urandom(3 * 2**20)  # an LFS file (served through the hub's "CDN" origin)
FILES = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "tokenizer.json": b"{}"}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("org/tiny", FILES)
        server.add_repo("org/tiny", {**FILES, "config.json": b'{"model_type": "llama", "v": 2}'}, "v2")
        server.add_repo("org/gated", FILES, gated=True)
        server.add_repo("org/adapter-only", {"adapter_config.json": b"{}"})
        yield server


@pytest.fixture
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/token")  # never the machine's own token
    return hub


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_references_name_one_directory_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_model_ref("hf://Qwen/Qwen2.5-0.5B").dir_name() == "Qwen--Qwen2.5-0.5B@main"
    assert parse_model_ref("hf://org/m@refs/pr/1").dir_name() == "org--m@refs--pr--1"
    assert parse_model_ref("hf://org/m", revision="v1").dir_name() == "org--m@v1"
    assert parse_model_ref("s3://models/llama/8b/").dir_name() == "s3--models--llama--8b@s3"
    assert parse_model_ref("/data/models/base").scheme == "path"
    for bad, hint in [
        ("hf://just-a-name", "hf://ORG/NAME"),
        ("hf://org/m@..", "branch, tag or commit"),
        ("s3://bucket", "s3://BUCKET/PREFIX"),
        ("s3://b/../etc", "s3://BUCKET/PREFIX"),
        ("gs://bucket/m", "hf://ORG/NAME@REVISION"),
    ]:
        with pytest.raises(ModelRefError) as err:
            parse_model_ref(bad, field="serving.model")
        assert str(err.value).startswith("serving.model: ") and repr(bad) in str(err.value), bad
        assert hint in str(err.value), bad
    with pytest.raises(ModelRefError, match="names revision 'v2' but the revision given is 'v1'"):
        parse_model_ref("hf://org/m@v2", revision="v1")


def test_a_hub_model_is_fetched_whole_pinned_to_its_commit_and_only_once(
    hub_env: HubServer, tmp_path: Path
) -> None:
    said: list[str] = []
    result = fetch_model("hf://org/tiny@v2", tmp_path, say=said.append, field="serving.model")
    final = tmp_path / "org--tiny@v2"
    assert result.fetched and result.path == str(final) and result.files == 3
    files = _tree(final)
    assert files.pop(MARKER) and files == {**FILES, "config.json": b'{"model_type": "llama", "v": 2}'}
    marker = json.loads((final / MARKER).read_text())
    assert marker["source"] == "hf://org/tiny@v2" and len(marker["revision"]) == 40
    # every file came from that one commit, whatever the branch did meanwhile
    resolved = {r.path for r in hub_env.requests if "/resolve/" in r.path}
    assert resolved and all(f"/resolve/{marker['revision']}/" in p for p in resolved), resolved
    assert any("3/3 files" in line for line in said), said
    assert not staging_paths(parse_model_ref("hf://org/tiny@v2"), tmp_path)[0].exists()
    hub_env.clear_requests()
    again = fetch_model("hf://org/tiny@v2", tmp_path)
    assert not again.fetched and again.revision == marker["revision"] and hub_env.requests == []


def test_a_cut_download_leaves_no_model_and_the_next_run_resumes_it(
    hub_env: HubServer, tmp_path: Path
) -> None:
    """Resuming is huggingface_hub's: within a run it continues a cut transfer with a Range request;
    across runs (huggingface_hub 2.x downloads each file to a process-unique temporary file, #4228)
    the files already complete are kept and only the others are downloaded again."""
    hub_env.clear_requests()
    hub_env.fail_after("model.safetensors", 2**20)  # huggingface_hub resumes this one itself...
    hub_env.fail_with_status("model.safetensors", 503)  # ...not a server that then fails: run again
    with pytest.raises(ModelSourceUnavailable) as err:
        fetch_model("hf://org/tiny", tmp_path, field="serving.model")
    assert err.value.exit_code == 1 and "running again keeps the files already downloaded" in str(err.value)
    assert not (tmp_path / "org--tiny@main").exists(), "nothing half-written where readers look"
    tries = [r for r in hub_env.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.cut_after for r in tries] == [2**20, None] and tries[1].status == 503, (
        "retried once, then gave up"
    )
    hub_env.clear_requests()
    result = fetch_model("hf://org/tiny", tmp_path)
    assert result.fetched and _tree(tmp_path / "org--tiny@main").items() >= FILES.items()
    again = [
        r.path.rsplit("/", 1)[-1] for r in hub_env.requests if r.method == "GET" and "/api/" not in r.path
    ]
    assert "config.json" not in again and "model.safetensors" in again, again


@pytest.mark.parametrize(
    ("model", "message", "hint"),
    [
        (
            "hf://org/gated",
            "is a gated repository and the token given cannot read it",
            "global.models.hfToken",
        ),
        ("hf://org/nope", "no repository 'org/nope'", "check the id"),
        ("hf://org/tiny@nope", "has no revision 'nope'", "name an existing branch"),
        ("hf://org/adapter-only", "has no config.json at its top level", "the model itself"),
    ],
)
def test_a_model_that_cannot_be_fetched_as_named_fails_for_good_naming_the_value(
    hub_env: HubServer, tmp_path: Path, model: str, message: str, hint: str
) -> None:
    ref = parse_model_ref(model)
    with pytest.raises(ModelFetchError) as err:
        fetch_model(model, tmp_path, field="serving.model")
    text = str(err.value)
    assert (
        err.value.exit_code == 2 and text.startswith("serving.model: ") and message in text and hint in text
    )
    assert not ref.local_dir(tmp_path).exists() and not staging_paths(ref, tmp_path)[0].exists()
    # the pods waiting for it see why
    assert message in (fetch_error(ref, tmp_path) or "")
    said: list[str] = []
    assert not wait_for_model(ref, tmp_path, timeout=0.2, say=said.append, poll=0.05)
    assert said and "its fetch failed: serving.model: " in said[0] and message in said[0]


def test_a_gated_model_is_fetched_with_a_token_from_a_file(hub_env: HubServer, tmp_path: Path) -> None:
    token = tmp_path / "secret" / "token"
    token.parent.mkdir()
    token.write_text(hub_env.token + "\n")
    root = tmp_path / "models"
    ref = parse_model_ref("hf://org/gated")
    note = staging_paths(ref, root)[2]
    note.parent.mkdir(parents=True)
    note.write_text("an earlier failure")
    # as the chart mounts the Secret: huggingface_hub reads HF_TOKEN_PATH when it is imported
    env = {**os.environ, "HF_ENDPOINT": hub_env.url, "HF_TOKEN_PATH": str(token)}
    cmd = [sys.executable, "-m", "loraplane.common.model_fetch", str(ref), f"--models-root={root}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (root / "org--gated@main" / "config.json").read_bytes() == CONFIG
    assert fetch_error(ref, root) is None, "a success clears the earlier failure"


def test_the_fetch_command_exits_2_with_the_message_and_0_with_a_json_result(
    hub_env: HubServer, tmp_path: Path
) -> None:
    env = {**os.environ, "HF_ENDPOINT": hub_env.url}
    cmd = [
        sys.executable,
        "-m",
        "loraplane.common.model_fetch",
        f"--models-root={tmp_path}",
        "--field=serving.model",
    ]
    bad = subprocess.run([*cmd, "hf://org/nope"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "error: serving.model: no repository 'org/nope'" in bad.stderr
    good = subprocess.run([*cmd, "hf://org/tiny@v2"], capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["path"] == str(tmp_path / "org--tiny@v2")
    assert "[loraplane.model_fetch] fetching hf://org/tiny@v2" in good.stderr
    wait = subprocess.run(
        [*cmd, "hf://org/tiny@v2", "--wait=5"], capture_output=True, text=True, env=env, timeout=60
    )
    assert wait.returncode == 0, wait.stderr


def test_an_offline_process_names_who_fetches_instead(hub_env: HubServer, tmp_path: Path) -> None:
    """The image is offline by default (vLLM and training pods never download): a training run on a
    reference nobody fetched yet says how to get it there."""
    env = {**os.environ, "HF_ENDPOINT": hub_env.url, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "loraplane.common.model_fetch", "hf://org/tiny", f"--models-root={tmp_path}"]
    done = subprocess.run(
        [*cmd, "--field=base_model.path"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "base_model.path: hf://org/tiny@main is not on the volume yet" in done.stderr
    assert "`loraplane models pull hf://org/tiny@main`" in done.stderr


def test_vllms_entry_point_serves_the_fetched_directory(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "loraplane.serving",
        "--model=hf://org/tiny@v2",
        f"--models-root={tmp_path}",
    ]
    shown = subprocess.run(
        [*argv, "--served-model-name=base", "--print-argv"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert f"--model {tmp_path}/org--tiny@v2 " in shown.stdout


# --- object storage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    model = tmp_path_factory.mktemp("s3-model")
    for name, data in FILES.items():
        (model / name).write_bytes(data)
    (model / "sub").mkdir()
    (model / "sub" / "extra.txt").write_bytes(b"nested")
    with S3Server() as server:
        server.create_bucket("models")
        server.upload_dir("models", "llama/tiny", model)
        server.create_bucket("locked")
        server.upload_dir("locked", "llama/tiny", model)
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


def test_an_s3_prefix_is_fetched_whole_and_resumes_file_by_file(s3_env: S3Server, tmp_path: Path) -> None:
    ref = parse_model_ref("s3://models/llama/tiny")
    staging = staging_paths(ref, tmp_path)[0]
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(WEIGHTS)  # done by an earlier, cut-off try
    said: list[str] = []
    result = fetch_model(ref, tmp_path, say=said.append)
    final = tmp_path / "s3--models--llama--tiny@s3"
    assert result.fetched and result.path == str(final) and result.files == 4
    files = _tree(final)
    assert files.pop(MARKER) and files == {**FILES, "sub/extra.txt": b"nested"}
    assert any("4/4 files" in line for line in said)


@pytest.mark.parametrize(
    ("model", "credentials", "message"),
    [
        ("s3://locked/llama/tiny", "denied", "access to s3://locked/llama/tiny denied"),
        ("s3://missing-bucket/llama/tiny", "good", "no bucket 'missing-bucket'"),
        ("s3://models/llama/none", "good", "holds no objects"),
        ("s3://models/llama/tiny", "unknown", "does not accept the credentials"),
    ],
)
def test_an_s3_model_that_cannot_be_read_fails_for_good_naming_the_value(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, credentials: str, message: str
) -> None:
    creds = {
        "good": s3.credentials,
        "denied": s3.add_user(f"reader-{os.getpid()}-{len(model)}", denied_buckets=("locked",)),
        "unknown": s3.unknown_credentials(),
    }[credentials]
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in s3.env(creds).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelFetchError) as err:
        fetch_model(model, tmp_path, field="serving.model")
    assert err.value.exit_code == 2 and message in str(err.value), str(err.value)
    assert "global.models.s3" in str(err.value) or "prefix" in str(err.value)
    assert not parse_model_ref(model).local_dir(tmp_path).exists()


def _tiny_run(work: Path, base_model: dict[str, str], dataset: dict[str, str]) -> Path:
    """A two-step training config in ``work``: what the tests vary is where the model and data are."""
    config = {
        "base_model": base_model,
        "dataset": dataset,
        "lora": {"r": 8, "alpha": 16},
        "training": {"max_steps": 2, "batch_size": 4, "max_seq_length": 128},
        "output": {"adapters_root": str(work / "adapters"), "name": "bot", "run_dir": str(work / "run")},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- the trainer ------------------------------------------------------------------------------------


def test_a_training_run_on_an_hf_reference_fetches_it_and_names_it_in_the_manifest(
    hub_env: HubServer, demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplane.trainer.config import load_config
    from loraplane.trainer.demo_tasks import TASKS, write_task_files
    from loraplane.trainer.train import train_and_publish

    hub_env.add_repo("org/demo", demo_model)
    monkeypatch.setenv("LORAPLANE_MODELS_ROOT", str(tmp_path / "models"))
    train = write_task_files(TASKS["sentiment"], tmp_path)[0]
    path = _tiny_run(tmp_path, {"path": "hf://org/demo@main"}, {"path": str(train)})
    published = train_and_publish(load_config(path))
    local = tmp_path / "models" / "org--demo@main"
    assert (local / "config.json").is_file()
    manifest = published.manifest
    assert manifest["base_model"]["source"] == "hf://org/demo@main"
    assert manifest["base_model"]["path"] == str(local)
    assert len(manifest["base_model"]["commit"]) == 40
    adapter_config = json.loads((Path(published.path) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(local), "vLLM's base-model check compares this"


def test_a_training_run_reads_its_dataset_from_an_s3_object(
    s3_env: S3Server, demo_model: Path, tmp_path: Path
) -> None:
    import hashlib

    from loraplane.trainer.config import load_config
    from loraplane.trainer.demo_tasks import TASKS, write_task_files
    from loraplane.trainer.train import train_and_publish

    train = write_task_files(TASKS["sentiment"], tmp_path)[0]
    s3_env.put_object("models", "data/sentiment-train.jsonl", train.read_bytes())
    path = _tiny_run(tmp_path, {"path": str(demo_model)}, {"url": "s3://models/data/sentiment-train.jsonl"})
    published = train_and_publish(load_config(path))
    data = published.manifest["dataset"]
    assert data["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest(), "the object's exact bytes"
    assert data["source"].startswith(str(tmp_path / "run" / "data")) and data["examples"] > 0

    path = _tiny_run(tmp_path / "again", {"path": str(demo_model)}, {"url": "s3://missing-bucket/x.jsonl"})
    missing = re.escape("dataset.url: nothing at s3://missing-bucket/x.jsonl")
    with pytest.raises(ModelFetchError, match=missing) as err:
        train_and_publish(load_config(path))
    assert err.value.exit_code == 2
    with pytest.raises(
        ConfigError, match=re.escape("dataset.url: 'https://x/y.jsonl' is not an s3:// object")
    ):
        load_config(path, ["dataset.url=https://x/y.jsonl"])
