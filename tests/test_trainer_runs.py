"""Training runs survive what a cluster does to them: SIGKILL, SIGTERM, a crash mid-checkpoint, torchrun.

Real training on the demo model, in child processes where a signal or a crash is part of the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplane.common.errors import InvalidInputError
from loraplane.platform.quickstart import free_port
from loraplane.trainer.checkpoints import MARKER
from loraplane.trainer.config import load_config
from loraplane.trainer.demo_tasks import TASKS, write_task_files
from loraplane.trainer.exit_codes import PREEMPTED

pytestmark = pytest.mark.e2e  # real training: the trainer as a process, torchrun

DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("data")
    return {name: write_task_files(task, out)[0] for name, task in TASKS.items()}


def _config(
    work: Path, demo_model: Path, train: Path, *, max_steps: int = 60, every: int | None = 4, **sections: Any
) -> Path:
    data: dict[str, Any] = {
        "base_model": {"path": str(demo_model)},
        "dataset": {"path": str(train)},
        "lora": {"r": 8, "alpha": 16},
        "training": {
            "learning_rate": 5e-3,
            "max_steps": max_steps,
            "batch_size": 4,
            "max_seq_length": 128,
            "logging_steps": 1,
            "seed": 3,
        },
        "checkpoints": {"every_steps": every, "keep_last": 2},
        "output": {"adapters_root": str(work / "adapters"), "name": "bot", "run_dir": str(work / "run")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(config: Path, *, code: str | None = None) -> subprocess.Popen[str]:
    """``python -m loraplane.trainer`` (or ``code`` that runs it) with JSON logs on stderr."""
    argv = [sys.executable, "-c", code, str(config)] if code else [sys.executable, "-m", "loraplane.trainer"]
    if not code:
        argv += ["--config", str(config)]
    env = {**os.environ, "LORAPLANE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, out, err


def _wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _weights(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _versions(work: Path) -> list[str]:
    root = work / "adapters" / "bot"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path]
) -> None:
    import torch

    from loraplane.trainer.train import train_and_publish

    reference = train_and_publish(load_config(_config(tmp_path / "ref", demo_model, task_files["sentiment"])))

    work = tmp_path / "killed"
    config = _config(work, demo_model, task_files["sentiment"])
    proc = _start(config)
    second = work / "run" / "checkpoint-8" / MARKER
    _wait_until(second.is_file, proc, "the second checkpoint")
    proc.kill()
    proc.wait()
    assert _versions(work) == [], "the run was killed before it finished: nothing may be published"

    code, out, err = _finish(_start(config))
    assert code == 0, err[-3000:]
    assert "resuming from checkpoint" in err
    result = json.loads(out.strip().splitlines()[-1])
    resumed = Path(result["adapter"])
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 8
    assert manifest["metrics"]["steps"] == reference.manifest["metrics"]["steps"] == 60
    # Same seed, same batches, optimizer and RNG state restored: the same numbers, to float32 noise.
    assert manifest["metrics"]["final_train_loss"] == pytest.approx(
        reference.manifest["metrics"]["final_train_loss"], abs=1e-4
    )
    ref_w, res_w = _weights(reference.path), _weights(resumed)
    assert ref_w.keys() == res_w.keys()
    for key in ref_w:
        torch.testing.assert_close(res_w[key], ref_w[key], atol=1e-5, rtol=1e-4, msg=key)
    assert not any(p.name.startswith("checkpoint-") for p in (work / "run").iterdir()), (
        "cleared once published"
    )

    # The published directory: weights, config, manifest, metrics and the loss curve; nothing else.
    assert sorted(p.name for p in resumed.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "manifest.json",
        "metrics.jsonl",
        "tensorboard",  # TensorBoard's event files (tracking.tensorboard, on by default)
    ]
    assert (resumed / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == list(range(1, 61)), "history survives the resume"
    for key in ("train_seconds", "tokens_seen", "tokens_per_second", "run_wall_seconds"):
        assert manifest["metrics"][key] > 0, key
    assert manifest["dataset"]["rows"] == manifest["dataset"]["examples"] > 0
    assert {"torch", "transformers", "peft", "trl"} <= manifest["environment"].keys()

    # At-least-once Jobs: the same job started again after success publishes nothing new.
    code, out, err = _finish(_start(config))
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["already_published"] is True
    assert _versions(work) == ["v1"]


CRASH_IN_CHECKPOINT = """
import os, sys
import loraplane.trainer.sft as sft
real = sft.mark_complete
def crash_at_8(path, *, step, run):
    if step == 8:
        os._exit(137)  # the process dies after the Trainer wrote the files, before the marker
    real(path, step=step, run=run)
sft.mark_complete = crash_at_8
from loraplane.trainer.__main__ import main
sys.exit(main(["--config", sys.argv[1]]))
"""


def test_crash_while_a_checkpoint_is_written_leaves_a_partial_one_that_is_skipped_and_named(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path]
) -> None:
    config = _config(tmp_path, demo_model, task_files["sentiment"], max_steps=12)
    code, _, _ = _finish(_start(config, code=CRASH_IN_CHECKPOINT))
    assert code == 137
    run = tmp_path / "run"
    assert (run / "checkpoint-4" / MARKER).is_file()
    partial = run / "checkpoint-8"
    assert partial.is_dir() and not (partial / MARKER).exists()
    assert (partial / "adapter_model.safetensors").is_file(), "the Trainer had written its files"

    code, out, err = _finish(_start(config))
    assert code == 0, err[-3000:]
    skipped = [json.loads(line) for line in err.splitlines() if "partial checkpoint" in line]
    assert skipped and skipped[0]["checkpoint"] == str(partial)
    manifest = json.loads((Path(json.loads(out.splitlines()[-1])["adapter"]) / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 4
    assert manifest["metrics"]["steps"] == 12


def _progress_steps(proc: subprocess.Popen[str], until: int) -> None:
    """Read the trainer's JSON log lines until it reports step ``until``."""
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg") == "train progress" and event.get("step", 0) >= until:
            return
    pytest.fail(f"trainer exited ({proc.wait()}) before step {until}")


def test_sigterm_saves_a_checkpoint_exits_75_and_a_changed_job_may_not_resume_it(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path]
) -> None:
    config = _config(tmp_path, demo_model, task_files["sentiment"], max_steps=400, every=None)
    proc = _start(config)
    _progress_steps(proc, until=3)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == PREEMPTED, err[-3000:]
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / MARKER).is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 3
    assert f"stopped by SIGTERM at step {step}" in err
    assert _versions(tmp_path) == []

    other_data = _config(tmp_path, demo_model, task_files["animals"], max_steps=400, every=None)
    code, _, err = _finish(_start(other_data))
    assert code == 2, err[-3000:]
    assert "refusing to resume" in err and "dataset (sha256)" in err

    shorter = _config(tmp_path, demo_model, task_files["sentiment"], max_steps=step + 2, every=None)
    code, out, err = _finish(_start(shorter))
    assert code == 0, err[-3000:]
    manifest = json.loads((Path(json.loads(out.splitlines()[-1])["adapter"]) / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == step


def test_two_process_torchrun_on_cpu_publishes_exactly_one_adapter(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path]
) -> None:
    config = _config(tmp_path, demo_model, task_files["sentiment"], max_steps=6, every=3)
    env = {**os.environ, "LORAPLANE_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "loraplane.trainer",
        "--config",
        str(config),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, "rank 0 alone reports the result"
    assert _versions(tmp_path) == ["v1"]
    adapter = tmp_path / "adapters" / "bot" / "v1"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 6
    assert not list((tmp_path / "adapters" / "bot").glob(".*")), "no staging leftovers"


def test_qlora_without_cuda_is_refused_before_anything_loads(
    tmp_path: Path, task_files: dict[str, Path]
) -> None:
    from loraplane.trainer.train import train_and_publish

    config = load_config(
        _config(
            tmp_path,
            tmp_path / "no-such-model",
            task_files["sentiment"],
            base_model={"quantization": "nf4"},
        )
    )
    with pytest.raises(InvalidInputError, match=r"base_model.quantization: 'nf4' \(QLoRA\) needs a CUDA GPU"):
        train_and_publish(config)
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "run").exists()


def test_a_published_version_is_never_overwritten(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path]
) -> None:
    from loraplane.trainer.train import train_and_publish

    existing = tmp_path / "adapters" / "bot" / "v1"
    existing.mkdir(parents=True)
    (existing / "adapter_model.safetensors").write_bytes(b"original")
    config = load_config(_config(tmp_path, demo_model, task_files["sentiment"], output={"version": "v1"}))
    with pytest.raises(InvalidInputError, match=r"bot@v1 already exists"):
        train_and_publish(config)
    assert (existing / "adapter_model.safetensors").read_bytes() == b"original"


CRASH_IN_PUBLISH = """
import os, sys
stage = os.environ["CRASH_STAGE"]
if stage == "before-rename":  # the staging directory holds the weights, the rename has not happened
    import loraplane.trainer.publish as publish
    publish.write_loss_plot = lambda *a, **k: os._exit(137)
else:  # "after-rename": the adapter is published, run.json does not say so yet
    from loraplane.trainer.checkpoints import RunState
    RunState.published = lambda self: os._exit(137)
from loraplane.trainer.__main__ import main
sys.exit(main(["--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("stage", ["before-rename", "after-rename"])
def test_a_kill_while_publishing_leaves_nothing_or_a_complete_adapter_and_the_restart_finishes(
    tmp_path: Path, demo_model: Path, task_files: dict[str, Path], stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, demo_model, task_files["sentiment"], max_steps=8, every=4)
    monkeypatch.setenv("CRASH_STAGE", stage)
    code, _, err = _finish(_start(config, code=CRASH_IN_PUBLISH))
    assert code == 137, err[-3000:]
    root = tmp_path / "adapters" / "bot"
    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    if stage == "before-rename":
        assert visible == [], "an adapter whose publish was interrupted must not be visible"
        assert list(root.glob(".v1.staging-*")), "the kill left its staging directory (swept on restart)"
    else:
        assert visible == ["v1"]
        assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {
            p.name for p in (root / "v1").iterdir()
        }
    published_before = (root / "v1" / "manifest.json").read_bytes() if visible else None

    code, out, err = _finish(_start(config))
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["version"] == "v1", "the restart publishes the version the run reserved, not a new one"
    assert result["already_published"] is (stage == "after-rename")
    assert sorted(p.name for p in root.iterdir()) == ["v1"], "no staging debris, no second version"
    if published_before is not None:
        assert (root / "v1" / "manifest.json").read_bytes() == published_before, "never rewritten"
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "published"
    assert not list((tmp_path / "run").glob("checkpoint-*"))
