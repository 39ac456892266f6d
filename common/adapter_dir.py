"""What makes a directory a LoRA adapter loraplane accepts, checked from its files alone.

Safetensors weights only (pickle-based weights are refused), a PEFT ``adapter_config.json`` of type
LORA with whole-number ranks, and a safetensors header that parses. Training (merge, export) and
serving (``serving/preflight.py``, which adds the checks against a server and its base model) share
these checks.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from loraplane.common.errors import InvalidInputError

# The LoRA ranks vLLM serves (--max-lora-rank takes only these): an adapter of another rank needs the
# next one up. The training config and the server config both check against this one list.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS: tuple[int, ...] = get_args(LoraRank)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit for the JSON header
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
UNSAFE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)


class AdapterPreflightError(InvalidInputError):
    """The adapter directory is not something vLLM may load."""


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


class SafetensorsHeaderError(ValueError):
    """A file that is not a readable safetensors file."""


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the file's header only."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise SafetensorsHeaderError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise SafetensorsHeaderError(f"header length {length} does not fit the file ({size} bytes)")
            header = json.loads(fh.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsHeaderError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("the header is not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise SafetensorsHeaderError(f"tensor {name!r} has no valid shape")
        shapes[name] = tuple(shape)
    return shapes


def check_adapter_files(path: Path) -> AdapterInfo:
    """The checks of :func:`preflight_adapter` that do not depend on a server or an adapters root.

    A directory of safetensors LoRA weights with a valid ``adapter_config.json`` passes, wherever it
    lives; DoRA is allowed (the caller decides). For anything a vLLM server will load, call
    :func:`preflight_adapter` instead.
    """
    require_exists(path)
    return check_files(Path(path).resolve())


def require_exists(path: Path) -> None:
    if not Path(path).exists():
        raise AdapterPreflightError(
            f"adapter path {path} does not exist", hint="check the path (train one first?)"
        )


def check_files(resolved: Path) -> AdapterInfo:
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
        tensors = read_safetensors_header(resolved / WEIGHTS_FILE)
    except SafetensorsHeaderError as exc:
        raise AdapterPreflightError(
            f"{resolved / WEIGHTS_FILE} is not a valid safetensors file: {exc}",
            hint="the file is damaged or incomplete: publish the adapter again",
        ) from None
    try:
        config = json.loads((resolved / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterPreflightError(f"{resolved} has no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise AdapterPreflightError(f"{resolved / CONFIG_FILE}: not valid JSON ({reason})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise AdapterPreflightError(f"{resolved / CONFIG_FILE}: peft_type is {got!r}, not 'LORA'")
    try:
        ranks = [int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    except (TypeError, ValueError, AttributeError):
        raise AdapterPreflightError(
            f"{resolved / CONFIG_FILE}: r and rank_pattern must be whole numbers"
        ) from None
    return AdapterInfo(path=resolved, rank=max(ranks), config=config, tensors=tensors)
