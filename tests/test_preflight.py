"""Adapters are checked before any server is asked to load them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_fake_adapter

from loraplane.serving.preflight import AdapterPreflightError, preflight_adapter


def test_good_adapter_passes(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1")
    info = preflight_adapter(path, adapters_root=tmp_path / "root", max_lora_rank=8)
    assert info.rank == 8
    assert info.path == path.resolve()


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterPreflightError, match="does not exist"):
        preflight_adapter(tmp_path / "root" / "nope", adapters_root=tmp_path / "root")


def test_path_outside_root_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "elsewhere" / "bot")
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    outside = write_fake_adapter(tmp_path / "elsewhere" / "bot")
    link = tmp_path / "root" / "bot" / "v1"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(link, adapters_root=tmp_path / "root")


def test_dotdot_escaping_root_is_refused(tmp_path: Path) -> None:
    write_fake_adapter(tmp_path / "elsewhere" / "bot")
    (tmp_path / "root").mkdir()
    with pytest.raises(AdapterPreflightError, match="outside the adapters root"):
        preflight_adapter(tmp_path / "root" / ".." / "elsewhere" / "bot", adapters_root=tmp_path / "root")


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", weights="adapter_model.bin")
    with pytest.raises(AdapterPreflightError, match="pickle-based weights"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_rank_above_server_limit_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", r=16)
    with pytest.raises(AdapterPreflightError, match="rank 16 exceeds the server's max_lora_rank 8"):
        preflight_adapter(path, adapters_root=tmp_path / "root", max_lora_rank=8)


def test_dora_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1", extra_config={"use_dora": True})
    with pytest.raises(AdapterPreflightError, match="DoRA"):
        preflight_adapter(path, adapters_root=tmp_path / "root")


def test_broken_config_is_refused(tmp_path: Path) -> None:
    path = write_fake_adapter(tmp_path / "root" / "bot" / "v1")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterPreflightError, match=r"adapter_config\.json: not valid JSON"):
        preflight_adapter(path, adapters_root=tmp_path / "root")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterPreflightError, match="not 'LORA'"):
        preflight_adapter(path, adapters_root=tmp_path / "root")
