"""``loraplane volume put``'s two ends without a cluster: the tar stream the CLI writes, unpacked by the
receiver that runs in the upload pod (tests/test_cluster_walk.py runs them through a real pod).
A damaged, truncated or hostile stream leaves nothing at the destination and nothing in staging."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from loraplane.platform.volume import VolumeError, _Sink, _tar_digest, _write_tar
from loraplane.platform.volume_receive import STAGING, Refused, receive


def _stream(local: Path) -> bytes:
    buffer = io.BytesIO()
    _write_tar(local, _Sink(buffer, lambda _n: None))
    return buffer.getvalue()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    return src


def _staging_empty(root: Path) -> bool:
    return not any((root / STAGING).iterdir())


def test_a_directory_arrives_whole_with_its_checksum(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    data = _stream(model)
    summary = receive(io.BytesIO(data), root, "models/base", sha256=_tar_digest(model), replace=False)
    assert summary == {"path": "models/base", "files": 2, "bytes": 25623, "sha256": _tar_digest(model)}
    assert (root / "models/base/config.json").read_text() == '{"model_type": "llama"}'
    assert (root / "models/base/sub/weights.bin").read_bytes() == (model / "sub" / "weights.bin").read_bytes()
    assert _staging_empty(root)


def test_the_stream_is_the_same_for_the_same_files(model: Path) -> None:
    """The CLI sends the digest before the data: both passes must write the very same bytes."""
    assert _tar_digest(model) == _tar_digest(model)
    (model / "config.json").touch()  # a new mtime changes nothing sent
    assert _tar_digest(model) == _tar_digest(model)


def test_a_single_file_can_be_put(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": []}\n')
    receive(io.BytesIO(_stream(train)), root, "datasets/x/train.jsonl", sha256=None, replace=False)
    assert (root / "datasets/x/train.jsonl").read_text() == '{"messages": []}\n'


@pytest.mark.parametrize("damage", ["checksum", "truncated"])
def test_a_damaged_upload_keeps_nothing(model: Path, tmp_path: Path, damage: str) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    data = _stream(model)
    digest = _tar_digest(model)
    if damage == "checksum":
        digest = "0" * 64
    else:
        data = data[: len(data) // 2]
    with pytest.raises((ValueError, tarfile.TarError)):
        receive(io.BytesIO(data), root, "models/base", sha256=digest, replace=False)
    assert not (root / "models").exists() or not (root / "models" / "base").exists()
    assert _staging_empty(root)


def test_members_outside_the_payload_or_escaping_it_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    for name in ("other/file", "payload/../../escape"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"hi"))
        with pytest.raises((ValueError, tarfile.TarError)):
            receive(io.BytesIO(buffer.getvalue()), root, "x", sha256=None, replace=False)
        assert not (root / "x").exists() and not (tmp_path / "escape").exists()
        assert _staging_empty(root)


def test_an_existing_destination_is_refused_unless_replaced(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "volume"
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "old.txt").write_text("old")
    with pytest.raises(Refused, match="already exists"):
        receive(io.BytesIO(_stream(model)), root, "models/base", sha256=None, replace=False)
    assert (root / "models/base/old.txt").read_text() == "old"
    receive(io.BytesIO(_stream(model)), root, "models/base", sha256=None, replace=True)
    assert sorted(p.name for p in (root / "models/base").iterdir()) == ["config.json", "sub"]
    assert _staging_empty(root)


@pytest.mark.parametrize("dest", ["", ".", "/abs/path", "../up", "a/../../b", f"{STAGING}/x"])
def test_destinations_outside_the_volume_are_refused(tmp_path: Path, dest: str) -> None:
    with pytest.raises(Refused):
        receive(io.BytesIO(b""), tmp_path, dest, sha256=None, replace=False)


def test_a_symbolic_link_in_the_upload_is_refused_by_the_cli(model: Path) -> None:
    (model / "link").symlink_to(model / "config.json")
    with pytest.raises(VolumeError, match="symbolic link"):
        _stream(model)


def test_the_upload_pod_keeps_the_vllm_pods_affinity_and_skips_the_recursive_chown() -> None:
    """With global.storage.singleNode the vLLM pods' affinity holds every pod that mounts the
    ReadWriteOnce volume on one node: the upload pod takes it over (its component is in the rule)."""
    from loraplane.platform.volume import VolumeTarget, upload_pod

    rule = {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {
                        "matchExpressions": [
                            {
                                "key": "app.kubernetes.io/component",
                                "operator": "In",
                                "values": ["vllm", "volume-put"],
                            }
                        ]
                    },
                }
            ]
        }
    }
    target = VolumeTarget(
        claim="data", mount_path="/data", image="img:1", pull_policy="IfNotPresent", affinity=rule
    )
    pod = upload_pod("p", "platform", target, deadline=60)
    assert pod["spec"]["affinity"] == rule
    assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    plain = upload_pod("p", "platform", VolumeTarget("data", "/data", "img:1", "IfNotPresent"), deadline=60)
    assert "affinity" not in plain["spec"]
