"""Merge a LoRA adapter into its base model and write a complete safetensors model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` and serves with vLLM without LoRA
support (or goes to another runtime): weights (safetensors only), ``config.json``, the generation
config, the tokenizer, and ``loraplane-merge.json`` saying what was merged into what.

Everything cheap is checked before a model is loaded: the adapter directory (the serving preflight's
file checks), the output directory, the manifest, the base model's name. The output is written into a
staging directory and renamed into place in one step, so it is either complete or absent.
"""

from __future__ import annotations

import errno
import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplane import __version__
from loraplane.common.adapter_dir import CONFIG_FILE, WEIGHTS_FILE, check_adapter_files
from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import sha256_file, staged_directory

log = logging.getLogger("loraplane.trainer")

PROVENANCE_FILE = "loraplane-merge.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Never written into a merged model: anything torch.load would unpickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class MergedModel:
    path: Path
    base_model: str
    base_revision: str | None
    adapter: Path
    dtype: str
    weights_sha256: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def weights_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.weights_sha256)


def merge_adapter(
    adapter_dir: Path,
    out_dir: Path,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    ref: str | None = None,
) -> MergedModel:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and write it to ``out_dir``.

    The base model is ``base_model`` if given, else the one in the adapter's ``manifest.json``
    (``base_model.path`` and ``revision``), else ``base_model_name_or_path`` from its
    ``adapter_config.json``. ``dtype`` ``auto`` keeps the dtype the base checkpoint is stored in.
    ``out_dir`` must not exist. ``ref`` (``name@version``) is recorded when the adapter came from
    the registry.
    """
    started = time.monotonic()
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    info = check_adapter_files(adapter_dir)
    adapter = info.path
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, adapter)
    manifest = read_manifest(adapter)
    adapter_sha = sha256_file(adapter / WEIGHTS_FILE)
    recorded_sha = manifest.get("weights_sha256")
    if recorded_sha is not None and recorded_sha != adapter_sha:
        raise InvalidInputError(
            f"{adapter / WEIGHTS_FILE} does not match the weights_sha256 in its manifest.json",
            hint="the adapter's weights changed after it was published: publish them as a new version",
        )
    base, revision, base_source = _base_model(adapter, info.config, manifest, base_model)
    recorded_base = _recorded_base(info.config, manifest)
    if base_model is not None and recorded_base is not None and recorded_base != base_model:
        log.warning(
            "merging into a base model other than the one the adapter was trained on",
            extra={"base_model": base_model, "trained_on": recorded_base},
        )

    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    # The tokenizer first: it is cheap, and a merged model nobody can tokenize for is not servable.
    has_own_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer_source = str(adapter) if has_own_tokenizer else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source,
            revision=None if has_own_tokenizer else revision,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot load a tokenizer for base model {base!r} (from {base_source}): {exc}",
            hint="pass --base-model with a local model directory or a hub id (set HF_TOKEN for gated models)",
        ) from None

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot load base model {base!r} (from {base_source}): {exc}",
            hint="pass --base-model with a local model directory or a hub id (set HF_TOKEN for gated models)",
        ) from None
    if getattr(model.config, "quantization_config", None) is not None:
        raise InvalidInputError(
            f"base model {base!r} is quantized; LoRA weights cannot be merged into quantized weights",
            hint="pass --base-model with the unquantized (16- or 32-bit) model",
        )

    try:
        lora_config = LoraConfig.from_pretrained(str(adapter))
        lora_config.inference_mode = True
        # PeftModel.from_pretrained without discarding the load result: keys the adapter has that the
        # base lacks (or the reverse) mean the adapter was trained on another model.
        peft_model = PeftModel(model, lora_config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft_model.load_adapter(
                str(adapter),
                "default",
                key_mapping=getattr(model, "_checkpoint_conversion_mapping", None) or None,
            )
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(
            f"adapter {adapter} does not fit base model {base!r}: {_first_lines(exc)}",
            hint="pass --base-model with the model the adapter was trained on",
        ) from None
    mismatched = [*loaded.missing_keys, *loaded.unexpected_keys]
    if mismatched:
        shown = ", ".join(mismatched[:3]) + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else "")
        raise InvalidInputError(
            f"adapter {adapter} does not fit base model {base!r}: "
            f"{len(loaded.missing_keys)} missing and {len(loaded.unexpected_keys)} unexpected adapter "
            f"weights ({shown})",
            hint="pass --base-model with the model the adapter was trained on",
        )
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge refuses NaN weights
    except ValueError as exc:
        raise InvalidInputError(f"cannot merge {adapter} into {base!r}: {exc}") from None
    written_dtype = str(merged.dtype).removeprefix("torch.")

    try:
        with staged_directory(out_dir) as staging:
            # transformers 5 writes safetensors only; the check below makes sure of it.
            merged.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            pickles = sorted(p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise LoraplaneError(f"refusing to write pickle-based files ({', '.join(pickles)})")
            weights = {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))}
            if not weights:
                raise LoraplaneError("transformers wrote no safetensors weights; nothing was written")
            provenance = {
                "schema": "loraplane.merge/v1",
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "adapter": {
                    "path": str(adapter),
                    "ref": ref,
                    "name": manifest.get("name"),
                    "version": manifest.get("version"),
                    "weights_sha256": adapter_sha,
                    "rank": info.rank,
                    "use_dora": bool(info.config.get("use_dora")),
                },
                "base_model": {"path": base, "revision": revision, "from": base_source},
                "trained_on": recorded_base,
                "tokenizer": "adapter" if has_own_tokenizer else "base model",
                "dtype": written_dtype,
                "weights_sha256": weights,
                "environment": {
                    "loraplane": __version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                    "python": platform.python_version(),
                },
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _exists_error(out_dir) from None  # it appeared while the model was loading
        raise LoraplaneError(f"cannot write the merged model to {out_dir}: {exc}") from exc
    result = MergedModel(
        path=out_dir,
        base_model=base,
        base_revision=revision,
        adapter=adapter,
        dtype=written_dtype,
        weights_sha256=weights,
        seconds=round(time.monotonic() - started, 2),
    )
    log.info("merged adapter", extra={"adapter": str(adapter), "base_model": base, "path": str(out_dir)})
    return result


def _first_lines(exc: BaseException, lines: int = 2, limit: int = 400) -> str:
    """torch lists every mismatched tensor; the first one or two say enough."""
    text = "\n".join(str(exc).strip().splitlines()[:lines])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exists_error(out_dir: Path) -> InvalidInputError:
    return InvalidInputError(
        f"{out_dir} already exists",
        hint="a merged model is written once: give a directory that does not exist",
    )


def _check_out_dir(out_dir: Path, adapter: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        raise _exists_error(out_dir)
    if out_dir.resolve().is_relative_to(adapter):
        raise InvalidInputError(
            f"{out_dir} is inside the adapter directory {adapter}",
            hint="published adapters are immutable: write the merged model somewhere else",
        )


def read_manifest(adapter: Path) -> dict[str, Any]:
    path = adapter / "manifest.json"
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise InvalidInputError(f"{path}: expected a JSON object")
    return manifest


def _recorded_base(config: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    spec = manifest.get("base_model")
    if isinstance(spec, dict) and spec.get("path"):
        return str(spec["path"])
    name = config.get("base_model_name_or_path")
    return str(name) if name else None


def _base_model(
    adapter: Path, config: dict[str, Any], manifest: dict[str, Any], given: str | None
) -> tuple[str, str | None, str]:
    """(base model, revision, where it came from)."""
    if given is not None:
        base, revision, source = given, None, "--base-model"
    elif isinstance(spec := manifest.get("base_model"), dict) and spec.get("path"):
        base, revision, source = str(spec["path"]), spec.get("revision"), "manifest.json"
    elif config.get("base_model_name_or_path"):
        base, revision, source = str(config["base_model_name_or_path"]), config.get("revision"), CONFIG_FILE
    else:
        raise InvalidInputError(
            f"{adapter}: neither manifest.json nor {CONFIG_FILE} names the base model",
            hint="pass --base-model with the model the adapter was trained on",
        )
    looks_local = base.startswith(("/", "./", "../", "~")) or base.count("/") > 1
    if looks_local and not Path(base).expanduser().exists():
        raise InvalidInputError(
            f"base model directory {base} (from {source}) does not exist",
            hint="pass --base-model with the model's current location or a hub id",
        )
    return str(Path(base).expanduser()) if looks_local else base, revision, source
