"""``loraplane adapters export NAME@vN --format ollama --out DIR``: an adapter for Ollama.

Two forms, both a directory that ``ollama create NAME -f DIR/Modelfile`` takes as it is:

- **adapter** (default): ``DIR/adapter/`` holds the LoRA weights (safetensors) and
  ``adapter_config.json``; the Modelfile says ``FROM`` the base model (``--base``: a model directory
  or an Ollama model name; by default the base model directory recorded in the adapter's manifest)
  and ``ADAPTER ./adapter``. Ollama converts a safetensors LoRA adapter for the Llama, Mistral
  (Mixtral) and Gemma 1/2 architectures only (its import documentation, and its converter), so any
  other base model is refused with the reason, as are DoRA adapters and adapters with fully trained
  modules (``modules_to_save``): Ollama's converter reads LoRA's A and B matrices and nothing else.
  ``--merged`` exports those.
- **merged** (``--merged``): the adapter merged into its base model (``loraplane adapters merge``,
  ``trainer/merge.py``) as ``DIR/model/``, and the Modelfile says ``FROM ./model``.

Both Modelfiles carry the chat template the adapter was trained with (the manifest's
``chat_template``, else the base model directory's), translated to Ollama's Go template syntax
(``platform/ollama_templates.py``), with ``PARAMETER stop`` for each end-of-turn marker and, when the
template has one, its default system prompt as ``SYSTEM``. ``DIR/loraplane-export.json`` records what
was exported from what. DIR is written through a staging directory renamed into place: it is
complete or absent.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from loraplane import __version__
from loraplane.common.adapter_dir import CONFIG_FILE, WEIGHTS_FILE, check_adapter_files
from loraplane.common.chat_templates import read_model_template
from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import sha256_file, staged_directory
from loraplane.common.settings import Settings
from loraplane.platform.ollama_templates import Translated, translate

log = logging.getLogger("loraplane.platform")

MODELFILE = "Modelfile"
PROVENANCE_FILE = "loraplane-export.json"
ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"
FORMATS = ("ollama",)

# Base model architectures (config.json ``architectures``) whose safetensors LoRA adapters Ollama
# converts: "Llama (including Llama 2, Llama 3, Llama 3.1, and Llama 3.2); Mistral (including Mistral
# 1, Mistral 2, and Mixtral); and Gemma (including Gemma 1 and Gemma 2)" (ollama docs/import.md).
ADAPTER_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral",
    "MixtralForCausalLM": "Mixtral",
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma 2",
}


@dataclass(frozen=True)
class OllamaExport:
    path: Path
    mode: Literal["adapter", "merged"]
    base: str  # the Modelfile's FROM
    family: str  # the chat template's family, or "custom" (--template)
    stops: list[str]
    system: str | None
    architecture: str | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def modelfile(self) -> Path:
        return self.path / MODELFILE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["modelfile"] = str(self.modelfile)
        return data


def export_ollama(
    settings: Settings,
    source: str,
    out_dir: Path,
    *,
    base: str | None = None,
    merged: bool = False,
    template_file: Path | None = None,
    stops: list[str] | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> OllamaExport:
    """Export the adapter ``source`` (a directory, or ``NAME@VERSION`` / ``NAME:ALIAS`` of the registry)
    for Ollama into ``out_dir`` (which must not exist). Raises InvalidInputError (exit 2) for what
    Ollama cannot take, with the reason."""
    started = time.monotonic()
    adapter, ref = _resolve(settings, source)
    info = check_adapter_files(adapter)
    adapter = info.path
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() or out_dir.is_symlink():
        raise InvalidInputError(
            f"{out_dir} already exists",
            hint="an export is written once: give a directory that does not exist",
        )
    if out_dir.resolve().is_relative_to(adapter):
        raise InvalidInputError(
            f"{out_dir} is inside the adapter directory {adapter}",
            hint="published adapters are immutable: write the export somewhere else",
        )
    from loraplane.trainer.merge import read_manifest

    manifest = read_manifest(adapter)
    recorded = _recorded_base(info.config, manifest)
    base_dir = _base_directory(base, recorded)
    notes: list[str] = []

    architecture = _architecture(base_dir)
    from_value = f"./{MODEL_SUBDIR}"
    if not merged:
        _check_adapter_form(info.config, architecture, adapter)
        if architecture is None:
            notes.append(
                "the base model's config.json is not readable here: its architecture was not checked "
                f"(Ollama takes adapters of {', '.join(sorted(set(ADAPTER_ARCHITECTURES.values())))})"
            )
        quantization = (manifest.get("base_model") or {}).get("quantization")
        if quantization not in (None, "none"):
            notes.append(
                f"the adapter was trained on a {quantization}-quantized base (QLoRA); Ollama applies it to "
                "the base model FROM names: prefer its unquantized weights"
            )
        from_value = _from_value(base, base_dir, recorded)

    translated = _prompt_format(manifest, base_dir, template_file, stops)
    notes.extend(translated.notes)

    try:
        with staged_directory(out_dir) as staging:
            if merged:
                from loraplane.trainer.merge import merge_adapter

                merge_base = str(base_dir) if base_dir is not None else base
                merge_adapter(
                    adapter,
                    staging / MODEL_SUBDIR,
                    base_model=merge_base,
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                    ref=ref,
                )
                architecture = _architecture(staging / MODEL_SUBDIR) or architecture
            else:
                (staging / ADAPTER_SUBDIR).mkdir()
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copyfile(adapter / name, staging / ADAPTER_SUBDIR / name)
            text = modelfile_text(
                from_value,
                adapter=None if merged else f"./{ADAPTER_SUBDIR}",
                template=translated.template,
                stops=translated.stops,
                system=translated.system,
            )
            (staging / MODELFILE).write_text(text, encoding="utf-8")
            provenance = {
                "schema": "loraplane.ollama-export/v1",
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "mode": "merged" if merged else "adapter",
                "adapter": {
                    "path": str(adapter),
                    "ref": ref,
                    "name": manifest.get("name"),
                    "version": manifest.get("version"),
                    "weights_sha256": sha256_file(adapter / WEIGHTS_FILE),
                },
                "from": from_value,
                "base_model": {"recorded": recorded, "directory": str(base_dir) if base_dir else None},
                "architecture": architecture,
                "chat_template_family": translated.family,
                "stops": translated.stops,
                "system": translated.system,
                "notes": notes,
                "loraplane": __version__,
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        raise InvalidInputError(f"{out_dir} appeared while exporting; nothing was written") from None
    except OSError as exc:
        raise LoraplaneError(f"cannot write the export to {out_dir}: {exc}") from exc
    log.info("exported adapter for ollama", extra={"adapter": str(adapter), "path": str(out_dir)})
    return OllamaExport(
        path=out_dir,
        mode="merged" if merged else "adapter",
        base=from_value,
        family=translated.family,
        stops=translated.stops,
        system=translated.system,
        architecture=architecture,
        notes=notes,
        seconds=round(time.monotonic() - started, 2),
    )


def modelfile_text(
    from_value: str,
    *,
    adapter: str | None,
    template: str,
    stops: list[str],
    system: str | None = None,
) -> str:
    """A Modelfile: FROM, ADAPTER, TEMPLATE (a triple-quoted block), SYSTEM, one PARAMETER stop each."""
    for what, value in (("template", template), ("system prompt", system or "")):
        if '"""' in value:
            raise InvalidInputError(f'the {what} contains """, which a Modelfile cannot quote')
    lines = [
        "# Written by loraplane " + __version__ + ": ollama create NAME -f Modelfile",
        f"FROM {_argument(from_value)}",
    ]
    if adapter is not None:
        lines.append(f"ADAPTER {_argument(adapter)}")
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.extend(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops)
    return "\n".join(lines) + "\n"


def _argument(value: str) -> str:
    """A FROM/ADAPTER argument: as is, or double-quoted when it has spaces or quotes."""
    if value and not any(c.isspace() or c == '"' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _resolve(settings: Settings, source: str) -> tuple[Path, str | None]:
    from loraplane.registry.backends import open_registry
    from loraplane.registry.model import REF_PATTERN, verify_weights

    path = Path(source).expanduser()
    if path.exists() or not REF_PATTERN.match(source):
        return path, None
    entry = open_registry(settings).read().resolve(source)
    verify_weights(entry)
    return Path(entry.path), entry.ref


def _recorded_base(config: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    spec = manifest.get("base_model")
    if isinstance(spec, dict) and spec.get("path"):
        return str(spec["path"])
    name = config.get("base_model_name_or_path")
    return str(name) if name else None


def _base_directory(base: str | None, recorded: str | None) -> Path | None:
    """The base model's directory here, where its config and tokenizer are read: ``--base`` when it is
    one, else the recorded base model's when it is still there."""
    for candidate in (base, recorded):
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser().resolve()
    return None


def _from_value(base: str | None, base_dir: Path | None, recorded: str | None) -> str:
    if base is not None:
        # A directory (absolute: the Modelfile may be used from anywhere) or an Ollama model name.
        return str(base_dir) if base_dir is not None and Path(base).expanduser().is_dir() else base
    if base_dir is not None:
        return str(base_dir)
    raise InvalidInputError(
        f"the adapter's base model {recorded or '(not recorded)'} is not a directory here, so the "
        "Modelfile cannot say FROM it",
        hint="pass --base with the base model's directory, or the name of the same model in Ollama "
        "(e.g. --base llama3.2:1b)",
    )


def _architecture(model_dir: Path | None) -> str | None:
    if model_dir is None:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    return None


def _check_adapter_form(config: dict[str, Any], architecture: str | None, adapter: Path) -> None:
    """Refuse what Ollama's adapter converter cannot take (exit 2), each with the way out."""
    if architecture is not None and architecture not in ADAPTER_ARCHITECTURES:
        supported = ", ".join(f"{name} ({arch})" for arch, name in ADAPTER_ARCHITECTURES.items())
        raise InvalidInputError(
            f"Ollama cannot apply a LoRA adapter to a {architecture} base model: it converts safetensors "
            f"adapters of {supported} only",
            hint="export the merged model instead (--merged): Ollama imports full models of more "
            "architectures",
        )
    if config.get("use_dora"):
        raise InvalidInputError(
            f"{adapter} is a DoRA adapter; Ollama's adapter converter reads LoRA's A and B matrices only",
            hint="export the merged model instead (--merged)",
        )
    if config.get("modules_to_save"):
        raise InvalidInputError(
            f"{adapter} also trains whole modules ({', '.join(map(str, config['modules_to_save']))}); "
            "an Ollama adapter carries LoRA matrices only",
            hint="export the merged model instead (--merged)",
        )


def _prompt_format(
    manifest: dict[str, Any], base_dir: Path | None, template_file: Path | None, stops: list[str] | None
) -> Translated:
    if template_file is not None:
        try:
            template = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"--template: cannot read {template_file}: {exc}") from None
        if not template.strip():
            raise InvalidInputError(f"--template: {template_file} is empty")
        return Translated("custom", template.removesuffix("\n"), list(stops or []))
    jinja, where = _jinja_template(manifest, base_dir)
    translated = translate(jinja, special_tokens=_special_tokens(base_dir))
    if stops:
        translated.stops.extend(s for s in stops if s not in translated.stops)
    log.info("chat template translated", extra={"family": translated.family, "from": where})
    return translated


def _jinja_template(manifest: dict[str, Any], base_dir: Path | None) -> tuple[str, str]:
    """The template the adapter was trained with (its manifest's), else the base model's."""
    recorded = manifest.get("chat_template")
    if isinstance(recorded, dict):
        text = recorded.get("text")
        if isinstance(text, str) and text.strip():
            return text, "manifest.json (chat_template)"
    if base_dir is not None:
        found = read_model_template(base_dir)
        if found is not None:
            return found.text, found.source
    raise InvalidInputError(
        "no chat template to translate: the adapter's manifest records none and the base model "
        f"{'directory ' + str(base_dir) + ' has none' if base_dir else 'is not a directory here'}",
        hint="pass --base with the base model's directory, or --template FILE with an Ollama Go template",
    )


def _special_tokens(base_dir: Path | None) -> dict[str, str]:
    """``bos_token`` and ``eos_token`` from the base model's tokenizer_config.json (a string, or an
    AddedToken as a dict with ``content``); empty when unknown."""
    if base_dir is None:
        return {}
    try:
        config = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    tokens: dict[str, str] = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            tokens[key] = value
    return tokens
