"""The run directory: which run it belongs to, its checkpoints, and which of them can be trusted.

Layout of ``<run_dir>``::

    run.json                      the run: id, adapter version it publishes, fingerprint, status
    checkpoint-<step>/            written by the HF Trainer (adapter, optimizer, scheduler, RNG states)
        loraplane-checkpoint.json written last, after every other file is fsynced: "this one is complete"
    checkpoint-<step>.partial-*   a checkpoint found without its marker at start, set aside and named

A checkpoint without the marker was interrupted mid-write (SIGKILL, node loss, full disk); resuming
from it could load a truncated optimizer state, so it is never used. The HF Trainer itself does not
guard against this (its atomic-checkpoint attempts were reverted twice: transformers #29336, #36112).

Only the global rank 0 process writes markers, sets partial checkpoints aside and deletes old ones, so
that nodes sharing one volume never race on the same files (transformers #20988).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from loraplane.common.errors import InvalidInputError
from loraplane.common.files import atomic_write_text, fsync_dir, sha256_file
from loraplane.trainer.config import TrainJobConfig

log = logging.getLogger("loraplane.trainer")

MARKER = "loraplane-checkpoint.json"
RUN_FILE = "run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ResumeRefusedError(InvalidInputError):
    """The run directory holds checkpoints that this configuration must not continue."""


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint must share with the job that resumes it."""

    base_model: str
    base_revision: str | None
    base_files: str  # sha256 over config.json and the weight files' names and sizes (local models)
    lora: dict[str, Any]
    dataset_sha256: str
    # Defaults: run directories written before DPO existed are SFT runs from a fresh LoRA.
    method: str = "sft"
    base_adapter: str = ""  # NAME@vN the run started from (method: dpo)

    def differences(self, other: Fingerprint) -> list[str]:
        labels = {
            "base_model": "base model",
            "base_revision": "base model revision",
            "base_files": "base model files",
            "lora": "LoRA shape",
            "dataset_sha256": "dataset (sha256)",
            "method": "training method",
            "base_adapter": "base adapter",
        }
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{label}: checkpoint has {theirs[key]!r}, this job has {mine[key]!r}"
            for key, label in labels.items()
            if mine[key] != theirs[key]
        ]


def base_model_files_digest(path: str) -> str:
    """A cheap identity of a local base model: config.json's bytes and each weight file's name and size.

    Hashing every weight byte of a 16 GB model on a network volume would add minutes to every restart;
    a changed config or a re-saved/re-sharded checkpoint still shows up here. Hub ids give ``""``: their
    identity is the id plus the revision.
    """
    root = Path(path)
    if not root.is_dir():
        return ""
    parts = []
    config = root / "config.json"
    if config.is_file():
        parts.append(f"config.json:{sha256_file(config)}")
    for weights in sorted([*root.glob("*.safetensors"), *root.glob("*.bin")]):
        parts.append(f"{weights.name}:{weights.stat().st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def fingerprint_for(config: TrainJobConfig, dataset_sha256: str) -> Fingerprint:
    lora = config.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
    return Fingerprint(
        base_model=config.base_model.path,
        base_revision=config.base_model.revision,
        base_files=base_model_files_digest(config.base_model.path),
        lora={"r": lora.r, "alpha": lora.alpha, "target_modules": targets, "use_rslora": lora.use_rslora},
        dataset_sha256=dataset_sha256,
        method=config.method,
        base_adapter=config.base_adapter or "",
    )


@dataclass(frozen=True)
class RunState:
    run_id: str
    name: str
    version: str
    fingerprint: Fingerprint
    config_sha256: str  # the whole job config: a rerun of a finished, identical job publishes nothing new
    started_at: str
    status: Literal["running", "published"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> RunState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["fingerprint"] = Fingerprint(**data["fingerprint"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ResumeRefusedError(
                f"{path}: unreadable run state ({exc})",
                hint="move the run directory aside (or set output.run_dir to a new one) to start afresh",
            ) from None

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / RUN_FILE, self.to_json())

    def published(self) -> RunState:
        return RunState(**{**asdict(self), "fingerprint": self.fingerprint, "status": "published"})


def new_run(name: str, version: str, fingerprint: Fingerprint, config_sha256: str) -> RunState:
    return RunState(
        run_id=uuid.uuid4().hex[:12],
        name=name,
        version=version,
        fingerprint=fingerprint,
        config_sha256=config_sha256,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        status="running",
    )


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def scan(run_dir: Path) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Complete and partial checkpoints in ``run_dir``, each sorted by step."""
    complete: list[Checkpoint] = []
    partial: list[Checkpoint] = []
    if not run_dir.is_dir():
        return complete, partial
    for entry in run_dir.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir():
            ckpt = Checkpoint(entry, int(match.group(1)))
            (complete if (entry / MARKER).is_file() else partial).append(ckpt)
    return sorted(complete, key=lambda c: c.step), sorted(partial, key=lambda c: c.step)


def set_partial_aside(partial: list[Checkpoint]) -> list[Path]:
    """Rename interrupted checkpoints to ``checkpoint-N.partial-<time>`` so that nothing resumes from
    them and a new save of the same step never mixes with their files. Rank 0 only."""
    moved = []
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for ckpt in partial:
        target = ckpt.path.with_name(f"{ckpt.path.name}.partial-{stamp}")
        os.rename(ckpt.path, target)
        moved.append(target)
        log.warning(
            "skipping partial checkpoint (interrupted while it was written)",
            extra={"checkpoint": str(ckpt.path), "moved_to": str(target)},
        )
    return moved


def mark_complete(ckpt_dir: Path, *, step: int, run: RunState) -> None:
    """fsync every file of the checkpoint, then write the marker that makes it resumable. Rank 0 only."""
    for child in ckpt_dir.rglob("*"):
        if child.is_file():
            with child.open("rb") as fh:
                os.fsync(fh.fileno())
    for directory in [ckpt_dir, *(p for p in ckpt_dir.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
    marker = {
        "run_id": run.run_id,
        "step": step,
        "fingerprint": asdict(run.fingerprint),
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(ckpt_dir / MARKER, json.dumps(marker, indent=2) + "\n")


def apply_retention(run_dir: Path, *, keep_last: int, protect: Path | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never ``protect``, the one this
    process resumed from) and every set-aside partial one. Rank 0 only. The marker goes first, so a
    deletion interrupted halfway leaves a partial checkpoint, never a "complete" one with files missing.
    """
    complete, _ = scan(run_dir)
    doomed = [c.path for c in complete[:-keep_last] if c.path != protect]
    doomed += [p for p in run_dir.glob("checkpoint-*.partial-*") if p.is_dir()]
    for path in doomed:
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        log.info("deleted old checkpoint", extra={"checkpoint": str(path)})
    return doomed


def clear_checkpoints(run_dir: Path) -> None:
    """Remove every checkpoint of a finished run (its adapter is published; they resume nothing)."""
    for path in run_dir.glob("checkpoint-*"):
        if path.is_dir():
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def check_resumable(ckpt: Checkpoint, run: RunState) -> None:
    """Refuse a checkpoint whose recorded fingerprint differs from this job's."""
    marker = json.loads((ckpt.path / MARKER).read_text(encoding="utf-8"))
    recorded = Fingerprint(**marker["fingerprint"])
    diffs = run.fingerprint.differences(recorded)
    if diffs:
        raise ResumeRefusedError(
            f"refusing to resume from {ckpt.path}: it was written by a different job\n  "
            + "\n  ".join(diffs),
            hint="restore the original base model / LoRA settings / dataset, or point output.run_dir "
            "at a new directory to start a new run",
        )
