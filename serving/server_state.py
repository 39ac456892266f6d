"""What a running vLLM server started by loraplane is, and what it did: one small JSON file.

``python -m loraplane.serving`` (the supervisor) writes it atomically whenever its phase changes;
readers never see a partial file:

- the readiness probe reads it instead of asking anything remote: the server is ready only once it
  has *tried* every servable adapter, and a version that failed to load on this server is not
  required (it is recorded, with the reason, in the file and in the registry);
- the CLI reads the server's limits from it (``--max-lora-rank``, ``--max-loras``, the base model),
  so ``register``, ``load`` and ``sync`` check an adapter against the server it will run on, not
  against a default.

Local mode keeps one file per server under ``<registry home>/servers/``; in a pod it lives on the
pod's own ``/tmp``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from loraplane.common.files import atomic_write_text

Phase = Literal["starting", "loading", "ready", "stopped"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ServerLimits(BaseModel):
    """The engine limits an adapter must fit (vLLM's flags of the same names)."""

    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int | None = None
    max_model_len: int


class ServerState(BaseModel):
    url: str = Field(description="The server's base URL (as clients on this machine reach it).")
    model: str = Field(description="The base model's path or hub id (vLLM's --model).")
    served_model_name: str
    chat_template: str | None = Field(
        default=None,
        description="vLLM's --chat-template (a file or an inline template) when it was started with one: "
        "the template chat requests get instead of the base model's own (registration compares it).",
    )
    limits: ServerLimits
    adapters_root: str | None = None
    phase: Phase = "starting"
    loaded: list[str] = Field(default_factory=list, description="Served names this server loaded.")
    failed: dict[str, str] = Field(default_factory=dict, description="Served name -> why it failed here.")
    required: list[str] | None = Field(
        default=None,
        description="Served names the registry says are served (state 'serving'), as the reconciler last "
        "saw it: the readiness probe requires those that did not fail here. None: no reconciler runs.",
    )
    pid: int = Field(default_factory=os.getpid)
    updated_at: str = Field(default_factory=_now)

    def write(self, path: Path) -> None:
        self.updated_at = _now()
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")


def read_state(path: Path) -> ServerState | None:
    """The state at ``path``, or None when there is none (or it is not one of ours)."""
    try:
        return ServerState.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def servers_dir(home: Path) -> Path:
    return home / "servers"


def state_path_for(home: Path, url: str) -> Path:
    """Where local mode keeps the state of the server at ``url``."""
    safe = url.split("://", 1)[-1].rstrip("/").replace(":", "-").replace("/", "_")
    return servers_dir(home) / f"{safe}.json"


def find_local_server(home: Path, url: str) -> ServerState | None:
    """The state of the running server at ``url`` started from the registry at ``home``, if any."""
    state = read_state(state_path_for(home, url))
    if state is None or state.phase == "stopped":
        return None
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return None  # the process that wrote it is gone: its limits say nothing about what runs there now
    except PermissionError:
        pass  # alive, under another user
    return state
