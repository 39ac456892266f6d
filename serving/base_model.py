"""The served base model as an adapter is checked against: its architecture and its weight shapes.

Everything is read without loading a weight: ``config.json`` and the JSON headers of the
``*.safetensors`` files (8 bytes of length, then the tensor names, dtypes and shapes). That makes
the check cheap enough to run before every load, and possible without torch.

How "the adapter's base matches the served base" is decided (see :func:`compare_base_names` and
``serving.preflight``):

1. by name: ``base_model_name_or_path`` equals the served model's path or hub id, or one of its
   served names, or resolves to the same directory;
2. else by identity: when that name can be found here (a local directory, or a hub id in the local
   Hugging Face cache), its ``config.json`` must describe the same model: architectures, model type,
   hidden size, layer count, intermediate size, vocabulary size and attention heads;
3. always by structure: every LoRA tensor of the adapter must belong to a module the served base
   has, with the matching input and output sizes. This is what decides when the adapter names a
   base that cannot be found here (trained on another machine, under another path).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.common.adapter_dir import SafetensorsHeaderError, read_safetensors_header

IDENTITY_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's sizes under ``text_config``."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """What two configs must share to be the same base model (for LoRA purposes)."""
    merged = _text_config(config)
    out: dict[str, Any] = {"architectures": sorted(config.get("architectures") or [])}
    out.update({key: merged.get(key) for key in IDENTITY_KEYS if merged.get(key) is not None})
    return out


def describe(config: dict[str, Any]) -> str:
    ident = identity(config)
    arch = ",".join(ident.get("architectures") or []) or ident.get("model_type", "unknown architecture")
    sizes = ", ".join(f"{k} {ident[k]}" for k in ("hidden_size", "num_hidden_layers") if k in ident)
    return f"{arch}{', ' + sizes if sizes else ''}"


def locate_model_dir(name_or_path: str) -> Path | None:
    """A directory with ``config.json`` for a path or a hub id in the local HF cache; else None."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    looks_like_hub_id = not name_or_path.startswith(("/", ".", "~")) and name_or_path.count("/") <= 1
    if not looks_like_hub_id or not name_or_path:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # an invalid repo id, a broken cache: not found here
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def read_config(directory: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return sorted({directory / f for f in weight_map.values()})
        except (OSError, json.JSONDecodeError, AttributeError):
            return []
    return sorted(directory.glob("*.safetensors"))


@dataclass(frozen=True)
class BaseModelFacts:
    """The served base model: where it is, the names it answers to, its config and weight shapes."""

    source: str  # vLLM's --model: a path or a hub id
    directory: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    served_names: tuple[str, ...] = ()

    @property
    def names(self) -> set[str]:
        return {self.source, str(self.directory), *self.served_names}

    @property
    def is_classifier(self) -> bool:
        return any(
            str(a).endswith("ForSequenceClassification") for a in self.config.get("architectures") or []
        )

    @property
    def modules(self) -> dict[str, tuple[int, ...] | None]:
        """Module path -> weight shape (None for quantized weights, whose stored shape is packed)."""
        found: dict[str, tuple[int, ...] | None] = {}
        for name, shape in self.tensors.items():
            if name.endswith(".weight"):
                found.setdefault(name.removesuffix(".weight"), shape)
            elif name.endswith(".qweight"):
                found[name.removesuffix(".qweight")] = None
        if "lm_head" not in found and self.config.get("tie_word_embeddings", True):
            embed = next((m for m in found if m.endswith("embed_tokens")), None)
            if embed is not None:
                found["lm_head"] = found[embed]
        return found


def load_base_model(source: str, *, served_names: tuple[str, ...] = ()) -> BaseModelFacts | None:
    """The facts of a base model that can be read here, or None (a hub id not in the local cache)."""
    directory = locate_model_dir(source)
    if directory is None:
        return None
    config = read_config(directory)
    if config is None:
        return None
    tensors: dict[str, tuple[int, ...]] = {}
    for weights in _weight_files(directory):
        try:
            tensors.update(read_safetensors_header(weights))
        except SafetensorsHeaderError:
            tensors = {}  # shapes unknown: the structural check is skipped, the name checks still run
            break
    return BaseModelFacts(
        source=source, directory=directory, config=config, tensors=tensors, served_names=served_names
    )


def same_name(adapter_base: str, base: BaseModelFacts) -> bool:
    if adapter_base in base.names:
        return True
    path = Path(adapter_base).expanduser()
    try:
        return path.exists() and path.resolve() == base.directory
    except OSError:
        return False


def compare_base_names(adapter_base: str, base: BaseModelFacts) -> str | None:
    """Why an adapter trained on ``adapter_base`` does not fit ``base``; None when it does or when
    ``adapter_base`` cannot be found here (then only the structural check decides)."""
    if same_name(adapter_base, base):
        return None
    directory = locate_model_dir(adapter_base)
    other = read_config(directory) if directory is not None else None
    if other is None:
        return None
    mine, theirs = identity(base.config), identity(other)
    differing = [
        f"{key} {theirs.get(key)!r} vs {mine.get(key)!r}"
        for key in sorted(set(mine) | set(theirs))
        if theirs.get(key) != mine.get(key)
    ]
    if not differing:
        return None
    return (
        f"it was trained on {adapter_base} ({describe(other)}) but the server serves {base.source} "
        f"({describe(base.config)}): {'; '.join(differing)}"
    )


def wait_for_model_dir(
    source: str, *, timeout: float, say: Callable[[str], None], every: float = 30.0, poll: float = 1.0
) -> bool:
    """Wait until the base model directory ``source`` (an absolute path) holds a ``config.json``.

    For a model on a shared volume that is not there yet (``loraplane volume put`` renames a complete
    upload into place, so the file appearing means the model is whole). Says what it waits for at
    once and every ``every`` seconds. True once the model is there (at once when ``source`` is not
    an absolute path: a hub id), False when ``timeout`` passes first."""
    import time

    directory = Path(source)
    if not directory.is_absolute() or (directory / "config.json").is_file():
        return True
    deadline = time.monotonic() + timeout
    next_say = time.monotonic()
    while not (directory / "config.json").is_file():
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= next_say:
            say(
                f"waiting for the base model at {directory} (no config.json there yet): put it on the "
                "shared volume with `loraplane volume put ./MODEL_DIR PATH` (PATH below the volume's "
                "mount: models/base for /data/models/base), or fix serving.model"
            )
            next_say = now + every
        time.sleep(min(poll, max(deadline - now, 0.0)))
    return True
