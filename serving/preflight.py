"""Checks an adapter directory must pass before any vLLM server is asked to load it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
UNSAFE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class AdapterPreflightError(InvalidInputError):
    """The adapter directory is not something vLLM may load."""


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    config: dict[str, Any]


def preflight_adapter(path: Path, *, adapters_root: Path, max_lora_rank: int | None = None) -> AdapterInfo:
    """Return facts about a servable adapter at ``path``, or raise AdapterPreflightError saying why not."""
    root = adapters_root.resolve()
    _require_exists(path)
    resolved = Path(path).resolve()  # follows symlinks: a link out of the root is caught below
    if not resolved.is_relative_to(root):
        raise AdapterPreflightError(
            f"adapter path {path} resolves to {resolved}, outside the adapters root {root}",
            hint="adapters must live under the adapters root; copy or publish it there",
        )
    info = _check_files(resolved)
    if info.config.get("use_dora"):
        raise AdapterPreflightError(
            f"{resolved}: DoRA adapters are not supported by vLLM", hint="train with use_dora=false"
        )
    if max_lora_rank is not None and info.rank > max_lora_rank:
        raise AdapterPreflightError(
            f"{resolved}: LoRA rank {info.rank} exceeds the server's max_lora_rank {max_lora_rank}",
            hint="raise the server's max_lora_rank or train with a smaller lora.r",
        )
    return info


def check_adapter_files(path: Path) -> AdapterInfo:
    """The checks of :func:`preflight_adapter` that do not depend on a server or an adapters root.

    A directory of safetensors LoRA weights with a valid ``adapter_config.json`` passes, wherever it
    lives; DoRA is allowed (the caller decides). For anything a vLLM server will load, call
    :func:`preflight_adapter` instead.
    """
    _require_exists(path)
    return _check_files(Path(path).resolve())


def _require_exists(path: Path) -> None:
    if not Path(path).exists():
        raise AdapterPreflightError(
            f"adapter path {path} does not exist", hint="check the path (train one first?)"
        )


def _check_files(resolved: Path) -> AdapterInfo:
    if not resolved.is_dir():
        raise AdapterPreflightError(f"adapter path {resolved} is not a directory")
    unsafe = [name for name in UNSAFE_WEIGHTS if (resolved / name).exists()]
    if unsafe:
        raise AdapterPreflightError(
            f"{resolved} contains pickle-based weights ({', '.join(unsafe)})",
            hint="only safetensors adapters are served: re-save with "
            "save_pretrained(safe_serialization=True)",
        )
    if not (resolved / WEIGHTS_FILE).is_file():
        raise AdapterPreflightError(f"{resolved} has no {WEIGHTS_FILE}")
    try:
        config = json.loads((resolved / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterPreflightError(f"{resolved} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise AdapterPreflightError(f"{resolved / CONFIG_FILE}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise AdapterPreflightError(f"{resolved / CONFIG_FILE}: peft_type is {got!r}, not 'LORA'")
    try:
        rank = max([int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    except (TypeError, ValueError, AttributeError):
        raise AdapterPreflightError(
            f"{resolved / CONFIG_FILE}: r and rank_pattern must be whole numbers"
        ) from None
    return AdapterInfo(path=resolved, rank=rank, config=config)
