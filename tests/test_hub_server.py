"""The local hub endpoint (tests/hub_server.py) with the real, unmodified huggingface_hub client.

These prove the stand-in is faithful enough for the client's own download code: revisions by branch
and by commit sha, the cache layout, LFS files through the CDN redirect, gated/missing repos and
revisions raising the client's own exceptions, and a connection cut mid-file. Two tests pin down
client behaviour (huggingface_hub 2.4) that code fetching models into a shared volume must allow for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import huggingface_hub.constants
import pytest
from hub_server import HubServer, RecordedRequest
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

MiB = 1024 * 1024
CLIENT_CHUNK = 10 * MiB  # the client writes what it received in chunks of this size (DOWNLOAD_CHUNK_SIZE)


@pytest.fixture(autouse=True)
def _isolated_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token or offline mode from the environment reaches the client; every call names its token."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


def files_under(root: Path) -> dict[str, bytes]:
    """A downloaded tree (without the client's own .cache/ bookkeeping)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).parts[0] != ".cache"
    }


def gets_of(hub: HubServer, filename: str) -> list[RecordedRequest]:
    return [r for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{filename}")]


def test_snapshot_download_by_branch_and_by_commit_sha(hub: HubServer, tmp_path: Path) -> None:
    v1_files = {
        "config.json": b'{"version": 1}',
        "nested/dir/tokenizer.json": b'{"vocab": ["a"]}',
        "model.safetensors": os.urandom(4096),  # LFS by name: served through the CDN redirect
        "only-in-v1.txt": b"gone in v2",
    }
    v2_dir = tmp_path / "v2-source"
    (v2_dir / "nested" / "dir").mkdir(parents=True)
    (v2_dir / "config.json").write_bytes(b'{"version": 2}')
    (v2_dir / "nested" / "dir" / "tokenizer.json").write_bytes(b'{"vocab": ["a", "b"]}')
    (v2_dir / "model.safetensors").write_bytes(os.urandom(8192))
    v1 = hub.add_repo("org/model", v1_files)
    v2 = hub.add_repo("org/model", v2_dir)  # a new commit on main, from a local directory
    dev = hub.add_repo("org/model", {"config.json": b'{"dev": true}'}, revision="dev")
    assert len({v1, v2, dev}) == 3

    by_branch = snapshot_download("org/model", local_dir=tmp_path / "main", endpoint=hub.url, token=hub.token)
    by_sha = snapshot_download(
        "org/model", revision=v1, local_dir=tmp_path / "v1", endpoint=hub.url, token=hub.token
    )
    other_branch = snapshot_download(
        "org/model", revision="dev", local_dir=tmp_path / "dev", endpoint=hub.url, token=hub.token
    )

    assert files_under(Path(by_branch)) == {
        path.relative_to(v2_dir).as_posix(): path.read_bytes() for path in v2_dir.rglob("*") if path.is_file()
    }
    assert files_under(Path(by_sha)) == v1_files
    assert files_under(Path(other_branch)) == {"config.json": b'{"dev": true}'}
    # main was resolved through the API; the sha was not (the client skips that call for a sha)
    api_calls = [r.path for r in hub.requests if r.path.startswith("/api/") and "/revision/" in r.path]
    assert api_calls == ["/api/models/org/model/revision/main", "/api/models/org/model/revision/dev"]
    # the LFS file came from the other origin, without the token (as from the hub's CDN)
    cdn = [r for r in hub.requests if r.origin == "cdn"]
    assert len(cdn) == 2 and all(r.authorization is None and r.status == 200 for r in cdn)
    assert all(r.authorization == f"Bearer {hub.token}" for r in hub.requests if r.origin == "hub")


def test_hf_hub_download_into_a_cache_dir(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_repo("gpt-tiny", {"config.json": b'{"n_layer": 2}', "weights.bin": b"\x00" * 1000})
    cache = tmp_path / "cache"

    config = Path(hf_hub_download("gpt-tiny", "config.json", cache_dir=cache, endpoint=hub.url, token=False))
    weights = Path(hf_hub_download("gpt-tiny", "weights.bin", cache_dir=cache, endpoint=hub.url, token=False))
    assert [r.origin for r in gets_of(hub, "weights.bin")] == ["cdn"]  # *.bin is an LFS file

    snapshot = cache / "models--gpt-tiny" / "snapshots" / sha
    assert config == snapshot / "config.json" and config.read_bytes() == b'{"n_layer": 2}'
    assert weights == snapshot / "weights.bin" and weights.read_bytes() == b"\x00" * 1000
    assert (cache / "models--gpt-tiny" / "refs" / "main").read_text() == sha
    assert config.is_symlink() and config.resolve().parent == (cache / "models--gpt-tiny" / "blobs").resolve()
    # a second call finds it in the cache: a HEAD to check the revision, no download
    before = len(gets_of(hub, "config.json"))
    again = hf_hub_download("gpt-tiny", "config.json", cache_dir=cache, endpoint=hub.url, token=False)
    assert again == str(config)
    assert len(gets_of(hub, "config.json")) == before


def test_a_gated_repo_needs_a_token_with_access(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/gated", {"config.json": b"{}", "model.safetensors": b"w" * 100}, gated=True)
    hub.add_token("hf_not_granted", gated_access=False)

    with pytest.raises(GatedRepoError) as anonymous:
        snapshot_download("org/gated", local_dir=tmp_path / "a", endpoint=hub.url, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as not_granted:
        hf_hub_download(
            "org/gated", "config.json", cache_dir=tmp_path / "c", endpoint=hub.url, token="hf_not_granted"
        )
    assert not_granted.value.response.status_code == 403

    granted = snapshot_download("org/gated", local_dir=tmp_path / "b", endpoint=hub.url, token=hub.token)
    assert files_under(Path(granted)) == {"config.json": b"{}", "model.safetensors": b"w" * 100}


def test_an_unknown_repo_raises_repository_not_found(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        snapshot_download("org/missing", local_dir=tmp_path / "a", endpoint=hub.url, token=False)
    assert anonymous.value.response.status_code == 401  # the hub does not tell anonymous callers more
    with pytest.raises(RepositoryNotFoundError) as authenticated:
        snapshot_download("org/missing", local_dir=tmp_path / "b", endpoint=hub.url, token=hub.token)
    assert authenticated.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/private", local_dir=tmp_path / "c", endpoint=hub.url, token=False)
    assert snapshot_download("org/private", local_dir=tmp_path / "d", endpoint=hub.url, token=hub.token)


def test_an_unknown_revision_raises_revision_not_found(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"})
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="v9", local_dir=tmp_path / "a", endpoint=hub.url, token=False)
    with pytest.raises(RevisionNotFoundError):  # a well-formed sha that is no commit of the repo
        snapshot_download(
            "org/model", revision="f" * 40, local_dir=tmp_path / "b", endpoint=hub.url, token=False
        )
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            "org/model", "config.json", revision="v9", cache_dir=tmp_path / "c", endpoint=hub.url, token=False
        )


def test_a_dataset_repo_and_a_missing_file(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_repo("org/data", {"train.jsonl": b'{"text": "hi"}\n'}, repo_type="dataset")
    local = snapshot_download(
        "org/data", repo_type="dataset", local_dir=tmp_path / "data", endpoint=hub.url, token=False
    )
    assert files_under(Path(local)) == {"train.jsonl": b'{"text": "hi"}\n'}
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        hf_hub_download(
            "org/data",
            "test.jsonl",
            repo_type="dataset",
            cache_dir=tmp_path / "c",
            endpoint=hub.url,
            token=False,
        )
    assert missing.value.response.headers["X-Repo-Commit"] == sha
    with pytest.raises(RepositoryNotFoundError):  # a dataset is no model
        snapshot_download("org/data", local_dir=tmp_path / "model", endpoint=hub.url, token=False)


def test_an_unknown_token_is_rejected(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"})
    with pytest.raises(HfHubHTTPError) as error:
        snapshot_download("org/model", local_dir=tmp_path / "a", endpoint=hub.url, token="hf_wrong")
    assert not isinstance(error.value, RepositoryNotFoundError)
    assert error.value.response.status_code == 401
    assert error.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"


def test_an_interrupted_download_resumes_with_a_range_request(hub: HubServer, tmp_path: Path) -> None:
    weights = os.urandom(13 * MiB)  # over one client chunk, so the cut comes after a chunk it kept
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.fail_after("model.safetensors", 11 * MiB)

    local = snapshot_download("org/big", local_dir=tmp_path / "big", endpoint=hub.url, token=hub.token)

    assert (Path(local) / "model.safetensors").read_bytes() == weights
    first, second = gets_of(hub, "model.safetensors")
    assert (first.range, first.cut_after) == (None, 11 * MiB)
    assert (second.range, second.status) == (f"bytes={CLIENT_CHUNK}-", 206)  # from the last whole chunk
    assert not list((tmp_path / "big").rglob("*.incomplete"))


def test_a_failed_download_is_not_resumed_by_the_next_call(hub: HubServer, tmp_path: Path) -> None:
    """huggingface_hub 2.4 resumes only within a call: a failed call deletes its partial file.

    (Its temporary files are unique per call since huggingface_hub PR #4228.) So a retry after a failed
    fetch downloads the file again from byte 0, and leaves nothing partial behind.
    """
    weights = os.urandom(13 * MiB)
    hub.add_repo("org/big", {"model.safetensors": weights})
    hub.fail_after("model.safetensors", 11 * MiB)
    hub.fail_with_status("model.safetensors", 500)  # the client's own retry fails too: the call fails

    with pytest.raises(HfHubHTTPError):
        snapshot_download("org/big", local_dir=tmp_path / "big", endpoint=hub.url, token=hub.token)
    assert files_under(tmp_path / "big") == {}
    assert not list((tmp_path / "big").rglob("*.incomplete"))
    hub.clear_requests()

    local = snapshot_download("org/big", local_dir=tmp_path / "big", endpoint=hub.url, token=hub.token)

    assert (Path(local) / "model.safetensors").read_bytes() == weights
    assert [(r.range, r.status) for r in gets_of(hub, "model.safetensors")] == [(None, 200)]


def test_an_unreachable_repo_returns_a_non_empty_local_dir_without_raising(
    hub: HubServer, tmp_path: Path
) -> None:
    """huggingface_hub 2.4: if the repo cannot be reached, a non-empty ``local_dir`` is returned as is.

    Only a warning is logged, even for a missing repo: whoever downloads into a volume that may hold an
    earlier attempt has to check the result itself (or use a fresh directory, where this test raises).
    """
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "leftover.txt").write_bytes(b"from an earlier attempt")

    assert snapshot_download("org/missing", local_dir=stale, endpoint=hub.url, token=False) == str(stale)


def test_the_environment_points_another_process_at_the_server(hub: HubServer, tmp_path: Path) -> None:
    """``HF_ENDPOINT`` and ``HF_TOKEN`` (``env()``) are all a subprocess's client needs."""
    hub.add_repo("org/gated", {"config.json": b'{"from": "the local hub"}'}, gated=True)
    code = "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))"
    env = {
        **os.environ,
        **hub.env(),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }

    out = subprocess.run(
        [sys.executable, "-c", code, "org/gated"], env=env, capture_output=True, text=True, timeout=60
    )

    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert snapshot.is_relative_to(tmp_path / "hf-home")
    assert (snapshot / "config.json").read_bytes() == b'{"from": "the local hub"}'


def test_ranges_and_errors_over_plain_http(hub: HubServer) -> None:
    hub.add_repo("org/model", {"notes.txt": b"0123456789"})
    url = f"{hub.url}/org/model/resolve/main/notes.txt"

    head = httpx.head(url)
    assert head.status_code == 200 and head.headers["Content-Length"] == "10"
    assert head.headers["X-Repo-Commit"] and head.headers["ETag"].startswith('"')
    assert not [name for name in head.headers if name.lower().startswith("x-xet")]
    suffix = httpx.get(url, headers={"Range": "bytes=-3"})
    assert (suffix.status_code, suffix.content, suffix.headers["Content-Range"]) == (
        206,
        b"789",
        "bytes 7-9/10",
    )
    middle = httpx.get(url, headers={"Range": "bytes=2-4"})
    assert (middle.status_code, middle.content) == (206, b"234")
    past_end = httpx.get(url, headers={"Range": "bytes=10-"})
    assert (past_end.status_code, past_end.headers["Content-Range"]) == (416, "bytes */10")
    missing = httpx.get(f"{hub.url}/org/model/resolve/main/nope.txt")
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "EntryNotFound")
    tree = httpx.get(f"{hub.url}/api/models/org/model/tree/main").json()
    assert tree == [{"type": "file", "oid": tree[0]["oid"], "size": 10, "path": "notes.txt"}]
