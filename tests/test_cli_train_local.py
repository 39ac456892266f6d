"""`loraplane train submit` with the local registry: the real trainer as a child process on the demo
model, its adapter registered once; and run_report's result line for the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplane.common.files import sha256_file
from loraplane.platform.quickstart import demo_trainer_config
from loraplane.trainer.demo_tasks import TASKS, write_task_files


def _cli(home: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(home),
        "LORAPLANE_ADAPTERS_ROOT": str(root),
        "LORAPLANE_REGISTRY": "local",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture
def demo_config(demo_model: Path, tmp_path: Path) -> Path:
    task = sorted(TASKS.values(), key=lambda t: t.name)[0]
    train, _ = write_task_files(task, tmp_path / "data")
    config = demo_trainer_config(task.name, demo_model, train, tmp_path / "adapters", epochs=1.0)
    config["training"]["max_steps"] = 2  # type: ignore[index]  # what is tested is the plumbing
    config["training"]["logging_steps"] = 1  # type: ignore[index]
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
def test_local_submit_trains_here_and_registers_the_adapter_once(demo_config: Path, tmp_path: Path) -> None:
    home, root = tmp_path / "state", tmp_path / "adapters"
    first = _cli(home, root, "train", "submit", str(demo_config), "-o", "json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    adapter = result["adapter"]
    assert result["registered"] is True and adapter["state"] == "registered"
    path = Path(adapter["path"])
    assert path.parent.parent == root.resolve() and (path / "adapter_model.safetensors").is_file()
    assert adapter["weights_sha256"] == sha256_file(path / "adapter_model.safetensors")
    assert adapter["manifest"]["name"] == adapter["name"] and adapter["base_model"]
    assert '"step"' in first.stderr or "training" in first.stderr, "the trainer's progress is shown"

    again = _cli(home, root, "train", "submit", str(demo_config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already registered {adapter['name']}@{adapter['version']}" in again.stdout
    shown = json.loads(_cli(home, root, "adapters", "show", adapter["name"], "-o", "json").stdout)
    assert [e["action"] for e in shown["history"]] == ["register"], "registered exactly once"

    # What a cluster Job prints for `train status` to register: the same version and weights.
    from loraplane.platform.run_report import RESULT_PREFIX

    report = subprocess.run(
        [sys.executable, "-m", "loraplane.platform.run_report", "--config", str(demo_config)],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    last = report.stdout.strip().splitlines()[-1]
    assert last.startswith(RESULT_PREFIX)
    line = json.loads(last[len(RESULT_PREFIX) :])
    assert (line["name"], line["version"], line["path"]) == (adapter["name"], adapter["version"], str(path))
    assert line["weights_sha256"] == adapter["weights_sha256"] and line["manifest"] == adapter["manifest"]


def test_local_submit_refuses_an_adapters_root_the_server_does_not_use(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": {"path": str(tmp_path / "base")},
                "dataset": {"path": str(tmp_path / "train.jsonl")},
                "output": {"adapters_root": str(tmp_path / "elsewhere"), "name": "bot"},
            }
        )
    )
    result = _cli(tmp_path / "state", tmp_path / "adapters", "train", "submit", str(config))
    assert result.returncode == 2, result.stderr
    assert "is not the adapters root the registry and server use" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "state").exists(), "nothing started"

    bad = _cli(tmp_path / "state", tmp_path / "elsewhere", "train", "submit", str(config), "lora.r=7")
    assert bad.returncode == 2 and "lora.r: got 7" in bad.stderr
