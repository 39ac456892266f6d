"""Checkpoint bookkeeping: what counts as complete, what retention may delete, what refuses a resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.trainer.checkpoints import (
    MARKER,
    Fingerprint,
    ResumeRefusedError,
    apply_retention,
    check_resumable,
    mark_complete,
    new_run,
    scan,
    set_partial_aside,
)

FP = Fingerprint("base", None, "digest", {"r": 8}, "data-sha")


def _checkpoint(run_dir: Path, step: int, *, complete: bool) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w")
    if complete:
        mark_complete(path, step=step, run=new_run("bot", "v1", FP, "cfg"))
    return path


def test_only_marked_checkpoints_are_complete(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4, complete=True)
    _checkpoint(tmp_path, 12, complete=False)
    _checkpoint(tmp_path, 8, complete=True)
    complete, partial = scan(tmp_path)
    assert [c.step for c in complete] == [4, 8]
    assert [c.step for c in partial] == [12]
    moved = set_partial_aside(partial)
    assert [p.name.split(".partial-")[0] for p in moved] == ["checkpoint-12"]
    assert scan(tmp_path) == (complete, [])


def test_retention_keeps_the_newest_and_the_one_resumed_from(tmp_path: Path) -> None:
    resumed = _checkpoint(tmp_path, 2, complete=True)
    for step in (4, 6, 8):
        _checkpoint(tmp_path, step, complete=True)
    (tmp_path / "checkpoint-9.partial-20260101T000000").mkdir()
    deleted = apply_retention(tmp_path, keep_last=2, protect=resumed)
    assert sorted(p.name for p in deleted) == ["checkpoint-4", "checkpoint-9.partial-20260101T000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]


def test_a_checkpoint_of_another_job_is_refused_with_each_difference(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4, complete=True)
    (ckpt,) = scan(tmp_path)[0]
    other = Fingerprint("other-base", None, "digest", {"r": 16}, "data-sha")
    with pytest.raises(ResumeRefusedError) as info:
        check_resumable(ckpt, new_run("bot", "v1", other, "cfg"))
    message = str(info.value)
    assert "base model: checkpoint has 'base', this job has 'other-base'" in message
    assert "LoRA shape" in message and "dataset (sha256)" not in message
    assert (ckpt.path / MARKER).is_file(), "refusing touches nothing"
