"""Training on this machine (the local registry): the trainer's own entry point as a child process,
then its published adapter registered, once.

The child is ``python -m loraplane.trainer`` — the command a cluster Job runs and the quickstart
uses — with this terminal as its stderr, so its progress bar (or, without a terminal, its JSON log
lines) shows as it trains. Its last stdout line names what it published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter
from loraplane.registry.backends import open_registry
from loraplane.registry.model import AdapterVersion
from loraplane.trainer.config import load_config
from loraplane.trainer.exit_codes import DO_NOT_RETRY, PREEMPTED


class LocalTrainingError(LoraplaneError):
    """The trainer process failed; its exit code becomes the CLI's."""

    def __init__(self, message: str, *, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LocalRun:
    adapter: AdapterVersion
    registered: bool  # False: this version was registered before (same weights)
    already_published: bool


def train_locally(settings: Settings, config_path: Path, overrides: list[str] | None = None) -> LocalRun:
    config = load_config(config_path, overrides)  # bad values stop here, before a process starts
    root = Path(config.output.adapters_root).expanduser().resolve()
    if root != settings.adapters_dir.expanduser().resolve():
        raise InvalidInputError(
            f"{config_path}: output.adapters_root {str(root)!r} is not the adapters root the registry and "
            f"server use ({settings.adapters_dir})",
            hint="set output.adapters_root to it, or pass --adapters-root to the CLI",
        )
    from loraplane.common.extras import require_extra

    require_extra("train")  # the trainer runs in a child process: say what is missing before it starts
    argv = [sys.executable, "-m", "loraplane.trainer", "--config", str(config_path), *(overrides or [])]
    # the trainer resolves base_adapter (DPO) in this CLI's registry, not the default one
    env = {**os.environ, "LORAPLANE_HOME": str(settings.home), "LORAPLANE_REGISTRY": settings.registry}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if proc.returncode != 0:
        meaning = {
            DO_NOT_RETRY: "the data, config or base model is wrong (see the trainer's message above)",
            PREEMPTED: "interrupted; a checkpoint was saved and the next run resumes from it",
        }.get(proc.returncode, "see the trainer's message above")
        raise LocalTrainingError(
            f"training {config.output.name} failed (exit code {proc.returncode}): {meaning}",
            exit_code=proc.returncode if proc.returncode in (DO_NOT_RETRY, 130) else 1,
        )
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        path = Path(result["adapter"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise LoraplaneError("the trainer exited 0 but printed no result line") from None
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    existing = (
        open_registry(settings).read().adapters.get(result["name"], None) if result.get("name") else None
    )
    if existing is not None and result["version"] in existing.versions:
        entry = existing.versions[result["version"]]
        if entry.weights_sha256 == manifest["weights_sha256"]:
            return LocalRun(entry, registered=False, already_published=bool(result["already_published"]))
    entry = register_adapter(settings, path)
    return LocalRun(entry, registered=True, already_published=bool(result["already_published"]))
