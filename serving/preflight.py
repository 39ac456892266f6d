"""Checks an adapter directory must pass before any vLLM server is asked to load it.

vLLM's own checks run inside the engine and answer with a 500 (or, for some, only fail later, when a
request uses the adapter); these run first, here, and say what is wrong and what to do:

- the path resolves (after symlinks) inside the adapters root, and is a directory;
- weights are ``adapter_model.safetensors`` with a readable header; pickle files are refused;
- ``adapter_config.json`` is LoRA with the fields vLLM requires, rank <= the server's max_lora_rank,
  and none of the features vLLM 0.32 rejects (``vllm/lora/peft_helper.py``: DoRA, LoRA bias,
  ``bias`` other than none, PiSSA/OLoRA/CorDA/LoftQ inits, aLoRA, layer replication, BD-LoRA,
  QALoRA, ``modules_to_save`` other than a classification model's ``classifier``/``score``);
- given the served base model (:class:`~loraplane.serving.base_model.BaseModelFacts`): the base the
  adapter names is the served one, its ``target_modules`` exist in the base, and every LoRA tensor
  fits a base module's shape (how names are compared: ``serving/base_model.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

from loraplane.common.adapter_dir import (
    CONFIG_FILE,
    LORA_KEY,
    WEIGHTS_FILE,
    AdapterInfo,
    AdapterPreflightError,
    check_files,
    require_exists,
)
from loraplane.serving.base_model import BaseModelFacts, compare_base_names

VLLM_MODULES_TO_SAVE = ("classifier", "score")  # and only on classification models
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits vLLM accepts


def preflight_adapter(
    path: Path,
    *,
    adapters_root: Path,
    max_lora_rank: int | None = None,
    base: BaseModelFacts | None = None,
) -> AdapterInfo:
    """Return facts about a servable adapter at ``path``, or raise AdapterPreflightError saying why not.

    ``base`` is the model the server serves; without it the checks against the base are skipped
    (registration, which knows no server, runs without it; every load runs with it).
    """
    root = adapters_root.resolve()
    require_exists(path)
    resolved = Path(path).resolve()  # follows symlinks: a link out of the root is caught below
    if not resolved.is_relative_to(root):
        raise AdapterPreflightError(
            f"adapter path {path} resolves to {resolved}, outside the adapters root {root}",
            hint="adapters must live under the adapters root; copy or publish it there",
        )
    info = check_files(resolved)
    _check_vllm_features(info, base)
    if max_lora_rank is not None and info.rank > max_lora_rank:
        raise AdapterPreflightError(
            f"{resolved}: LoRA rank {info.rank} exceeds the server's max_lora_rank {max_lora_rank}",
            hint="raise the server's max_lora_rank or train with a smaller lora.r",
        )
    if base is not None:
        check_against_base(info, base)
    return info


def _check_vllm_features(info: AdapterInfo, base: BaseModelFacts | None) -> None:
    """What vLLM's PEFTHelper refuses (as a 500 from the engine), refused here first."""
    where = info.path / CONFIG_FILE
    config = info.config
    missing = [key for key in ("r", "lora_alpha", "target_modules") if config.get(key) in (None, "", [])]
    if missing:
        raise AdapterPreflightError(f"{where}: missing {', '.join(missing)} (vLLM requires them)")
    if int(config["r"]) <= 0 or any(int(v) <= 0 for v in (config.get("rank_pattern") or {}).values()):
        raise AdapterPreflightError(f"{where}: LoRA ranks must be positive")
    save = config.get("modules_to_save") or []
    if isinstance(save, str):
        save = [save]
    unsupported = [m for m in save if m not in VLLM_MODULES_TO_SAVE]
    if unsupported:
        raise AdapterPreflightError(
            f"{where}: modules_to_save {unsupported} are full copies of base layers, which vLLM cannot "
            "serve as part of an adapter (it supports none, or classifier/score on classification models)",
            hint="train without modules_to_save (and without resizing the vocabulary), or merge the "
            "adapter into a full model: loraplane adapters merge",
        )
    if save and base is not None and not base.is_classifier:
        raise AdapterPreflightError(
            f"{where}: modules_to_save {list(save)} needs a classification model, but the server serves "
            f"{base.source} ({', '.join(base.config.get('architectures') or ['?'])})",
            hint="serve this adapter on its classification base model, or train it without modules_to_save",
        )
    refused: list[tuple[bool, str, str]] = [
        (
            bool(config.get("use_dora")),
            "DoRA adapters are not supported by vLLM",
            "train with use_dora=false",
        ),
        (
            bool(config.get("lora_bias")),
            "LoRA bias (lora_bias) is not supported by vLLM",
            "train with lora_bias=false",
        ),
        (
            config.get("bias", "none") not in ("none", None),
            f"bias={config.get('bias')!r} is not supported by vLLM",
            "train with bias='none'",
        ),
        (
            isinstance(config.get("init_lora_weights"), str)
            and str(config["init_lora_weights"]).lower() not in VLLM_INITS,
            f"init_lora_weights={config.get('init_lora_weights')!r} changes the base weights; "
            "vLLM cannot serve it",
            "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion",
        ),
        (
            bool(config.get("alora_invocation_tokens")),
            "Activated LoRA (aLoRA) is not supported by vLLM",
            "train a plain LoRA",
        ),
        (
            bool(config.get("layer_replication")),
            "layer_replication is not supported by vLLM",
            "train without it",
        ),
        (
            bool(config.get("use_bdlora")),
            "block-diagonal LoRA is not supported by vLLM",
            "train a plain LoRA",
        ),
        (bool(config.get("use_qalora")), "QALoRA is not supported by vLLM", "train a plain LoRA"),
    ]
    for failed, message, hint in refused:
        if failed:
            raise AdapterPreflightError(f"{info.path}: {message}", hint=hint)


def _matches(target: str, module: str) -> bool:
    return module == target or module.endswith("." + target)


def check_against_base(info: AdapterInfo, base: BaseModelFacts) -> None:
    """The adapter was made for the served base: same base, its target modules exist, shapes fit."""
    hint = f"train the adapter on the served base model ({base.source})"
    named = info.config.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        mismatch = compare_base_names(named, base)
        if mismatch:
            raise AdapterPreflightError(f"{info.path}: wrong base model: {mismatch}", hint=hint)
    modules = base.modules
    if not modules:
        return  # the base's weight headers are not readable here: only the name check applied
    targets = info.config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterPreflightError(
                f"{info.path / CONFIG_FILE}: target_modules is not a valid regex ({exc})"
            ) from None
        if not any(pattern.fullmatch(m) for m in modules):
            raise AdapterPreflightError(
                f"{info.path}: target_modules {targets!r} matches no module of the served base model "
                f"{base.source}",
                hint=hint,
            )
    elif isinstance(targets, list):
        absent = [t for t in targets if not any(_matches(str(t), m) for m in modules)]
        if absent:
            sample = sorted({m.rsplit(".", 1)[-1] for m in modules})[:12]
            raise AdapterPreflightError(
                f"{info.path}: target_modules {absent} are not modules of the served base model "
                f"{base.source} (its modules include: {', '.join(sample)})",
                hint=hint,
            )
    fan_in_fan_out = bool(info.config.get("fan_in_fan_out"))
    for key, shape in sorted(info.tensors.items()):
        match = LORA_KEY.match(key)
        if match is None:
            continue
        module, kind = match["module"], match["kind"]
        if module not in modules:
            raise AdapterPreflightError(
                f"{info.path / WEIGHTS_FILE}: tensor {key} is for module {module}, which the served base "
                f"model {base.source} does not have",
                hint=hint,
            )
        base_shape = modules[module]
        if base_shape is None or fan_in_fan_out or len(base_shape) != 2 or len(shape) != 2:
            continue
        out_features, in_features = base_shape
        expected = {
            "lora_A": (1, in_features),
            "lora_B": (0, out_features),
            "lora_embedding_A": (1, out_features),  # embedding weights are [vocab, hidden]
            "lora_embedding_B": (0, in_features),
        }[kind]
        axis, size = expected
        if shape[axis] != size:
            raise AdapterPreflightError(
                f"{info.path}: wrong base model: {key} has shape {list(shape)}, but the served base "
                f"model's {module} weight is {list(base_shape)} (expected {size} on axis {axis})",
                hint=hint,
            )
