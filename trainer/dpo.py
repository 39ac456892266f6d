"""``method: dpo``: preference tuning with trl's ``DPOTrainer``, on the SFT path's rails.

Everything around the trainer is the SFT run's (``loraplane.trainer.train``): the data checks
(:mod:`~loraplane.trainer.preference_data` through ``prepare_datasets``), the run directory, resume,
SIGTERM, checkpoint markers and retention (:class:`~loraplane.trainer.sft.CompleteCheckpoints`) and the
atomic publish with its manifest. This module adds what differs:

* :func:`resolve_base_adapter`: ``base_adapter: NAME@vN`` through the registry, or as ``train submit``
  resolved it for a pod that reads no registry (:func:`resolve_for_submit`, ``LORAPLANE_BASE_ADAPTER``);
  either way the weights must still match the sha256 recorded at registration, the base model must be
  the job's, and its LoRA shape is used. The checks are these functions', written once for both;
* :func:`build_trainer`: the DPO trainer. Starting from a base adapter, that adapter is both the
  starting LoRA weights and the frozen reference (trl copies it into a ``ref`` adapter); otherwise a
  fresh LoRA is trained and the reference is the base model (adapter disabled).

The resolution is cheap (no torch); the trainer part imports torch/trl when called.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.trainer.config import ADAPTER_REF_PATTERN, LoraSpec, TrainJobConfig
from loraplane.trainer.exit_codes import DoNotRetryError

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from loraplane.common.settings import Settings
    from loraplane.registry.model import AdapterVersion
    from loraplane.trainer.data import TokenizedExample

log = logging.getLogger("loraplane.trainer")


@dataclass(frozen=True)
class BaseAdapter:
    """The registered adapter version a DPO run starts from."""

    ref: str
    path: Path
    weights_sha256: str
    method: str  # what trained it (manifests before DPO have no method: sft)
    run_id: str | None

    def to_manifest(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "path": str(self.path),
            "weights_sha256": self.weights_sha256,
            "method": self.method,
            "run_id": self.run_id,
        }


BASE_ADAPTER_ENV = "LORAPLANE_BASE_ADAPTER"
ADAPTER_REF = re.compile(ADAPTER_REF_PATTERN)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BaseAdapterChangedError(DoNotRetryError):
    """The base adapter's weights are gone or are not the ones registered: the same every attempt."""


@dataclass(frozen=True)
class ResolvedBaseAdapter:
    """``base_adapter: NAME@vN`` as the registry knows it: what a trainer needs to start from it without
    reading the registry. ``loraplane train submit`` resolves it with the CLI user's access and hands it
    to the training pod (which has no API token) as JSON in ``LORAPLANE_BASE_ADAPTER``; the trainer
    still checks the weights against ``weights_sha256`` before it trains."""

    ref: str
    path: str  # the adapter's directory as the trainer sees it (on the shared volume, in a cluster)
    weights_sha256: str

    def to_env(self) -> str:
        return json.dumps(
            {"ref": self.ref, "path": self.path, "weights_sha256": self.weights_sha256}, sort_keys=True
        )

    @classmethod
    def from_env(cls, text: str) -> ResolvedBaseAdapter:
        problem = None
        try:
            data = json.loads(text)
            resolved = cls(ref=data["ref"], path=data["path"], weights_sha256=data["weights_sha256"])
        except (ValueError, TypeError, KeyError) as exc:
            problem = f"not JSON with ref, path and weights_sha256 ({type(exc).__name__}: {exc})"
        else:
            if not isinstance(resolved.ref, str) or not ADAPTER_REF.match(resolved.ref):
                problem = f"ref {resolved.ref!r} is not NAME@vN"
            elif not isinstance(resolved.path, str) or not resolved.path.startswith("/"):
                problem = f"path {resolved.path!r} is not an absolute directory"
            elif not isinstance(resolved.weights_sha256, str) or not SHA256.match(resolved.weights_sha256):
                problem = f"weights_sha256 {resolved.weights_sha256!r} is not a sha256"
        if problem is not None:
            raise InvalidInputError(
                f"{BASE_ADAPTER_ENV}: {problem}",
                hint="`loraplane train submit` sets it; unset it to look base_adapter up in the registry",
            )
        return resolved


def registered_base_adapter(settings: Settings, ref: str, *, hint: str = "") -> AdapterVersion:
    """``ref`` (NAME@vN) in ``settings``' registry: it must be registered and not retired.

    Raises InvalidInputError (exit 2) naming ``base_adapter``; ``hint`` is added to the unknown one's.
    """
    from loraplane.registry.backends import open_registry
    from loraplane.registry.model import RegistryError

    where = f"at {settings.home}" if settings.registry == "local" else f"namespace {settings.namespace}"
    try:
        entry = open_registry(settings).read().resolve(ref)
    except (RegistryError, InvalidInputError) as exc:
        raise InvalidInputError(
            f"base_adapter: {ref!r} is not in the registry ({settings.registry} registry {where}): "
            f"{exc.message}",
            hint="register the SFT adapter first (loraplane adapters register PATH)" + hint,
        ) from None
    if entry.state == "retired":
        raise InvalidInputError(
            f"base_adapter: {ref} is retired ({settings.registry} registry {where}); a retired version "
            "is not trained on",
            hint=f"start from a version that is not retired (see loraplane adapters show {entry.name})",
        )
    return entry


def verify_base_weights(resolved: ResolvedBaseAdapter) -> None:
    """Refuse (exit 2: a retry fails the same way) a base adapter whose weights file is gone or differs
    from the sha256 recorded at registration; the registry's own check, on the resolved values."""
    from loraplane.registry.model import AdapterVersion, IntegrityError, verify_weights

    name, _, version = resolved.ref.partition("@")
    entry = AdapterVersion(
        name=name,
        version=version,
        served_name=resolved.ref,
        path=resolved.path,
        weights_sha256=resolved.weights_sha256,
    )
    try:
        verify_weights(entry)
    except IntegrityError as exc:
        raise BaseAdapterChangedError(f"base_adapter: {exc.message}", hint=exc.hint) from None


def resolve_for_submit(settings: Settings, config: TrainJobConfig) -> ResolvedBaseAdapter | None:
    """``train submit``'s half of :func:`resolve_base_adapter`, with the CLI user's registry access.

    The checks that need no adapter files: registered, not retired, trained on this job's base model (by
    the base model's recorded name and source; the trainer compares the files too). The weights are
    verified here when this machine can read them (a shared mount), and always by the trainer.
    """
    ref = config.base_adapter
    if ref is None:
        return None
    entry = registered_base_adapter(settings, ref)
    resolved = ResolvedBaseAdapter(ref=entry.ref, path=entry.path, weights_sha256=entry.weights_sha256)
    if not entry.path.startswith("/"):
        raise InvalidInputError(
            f"base_adapter: {ref} is registered at {entry.path!r}, not an absolute path a pod can read"
        )
    if (Path(entry.path) / "adapter_model.safetensors").is_file():
        verify_base_weights(resolved)
    _check_same_base(config, ref, entry.manifest, {})
    return resolved


def _pre_resolved(ref: str) -> ResolvedBaseAdapter | None:
    """The base adapter ``train submit`` resolved for this pod (``LORAPLANE_BASE_ADAPTER``), if any."""
    text = os.environ.get(BASE_ADAPTER_ENV, "").strip()
    if not text:
        return None
    resolved = ResolvedBaseAdapter.from_env(text)
    if resolved.ref != ref:
        raise InvalidInputError(
            f"{BASE_ADAPTER_ENV} was resolved for {resolved.ref}, but base_adapter is {ref}",
            hint="submit the run again (loraplane train submit resolves base_adapter for the pod)",
        )
    return resolved


def resolve_base_adapter(config: TrainJobConfig) -> tuple[TrainJobConfig, BaseAdapter | None]:
    """Find ``config.base_adapter``; return the config with the adapter's LoRA shape.

    Pre-resolved by ``train submit`` (``LORAPLANE_BASE_ADAPTER``: a pod reads no registry), else looked
    up in the registry of ``LORAPLANE_HOME`` / ``LORAPLANE_REGISTRY``. Either way the weights must match
    the registered sha256 (else BaseAdapterChangedError, exit 2). Raises InvalidInputError (exit 2)
    naming ``base_adapter`` when the version is unknown or retired, was trained on another base model,
    or has another LoRA shape than an explicit ``lora`` section.
    """
    ref = config.base_adapter
    if ref is None:
        return config, None
    resolved, manifest = _pre_resolved(ref), {}  # the pod of `train submit`: resolved for it
    if resolved is None:
        from loraplane.common.settings import Settings

        entry = registered_base_adapter(
            Settings(),
            ref,
            hint=", and run the trainer with the same LORAPLANE_HOME / LORAPLANE_REGISTRY as the CLI",
        )
        resolved = ResolvedBaseAdapter(ref=entry.ref, path=entry.path, weights_sha256=entry.weights_sha256)
        manifest = entry.manifest
    verify_base_weights(resolved)
    path = Path(resolved.path)
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"base_adapter: {ref}: cannot read {path / 'adapter_config.json'}: {exc}"
        ) from None
    manifest = manifest or _read_manifest(path)
    _check_same_base(config, ref, manifest, adapter_config)
    lora = _lora_of(config, ref, adapter_config)
    adapter = BaseAdapter(
        ref=resolved.ref,
        path=path,
        weights_sha256=resolved.weights_sha256,
        method=str(manifest.get("method") or "sft"),
        run_id=manifest.get("run_id"),
    )
    log.info("starting from a registered adapter", extra={"base_adapter": resolved.ref, "path": str(path)})
    return config.model_copy(update={"lora": lora}), adapter


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_names(value: str, revision: str | None = None) -> set[str]:
    """The names a base model goes by: the text, and for an ``hf://`` / ``s3://`` reference the directory
    it is fetched to (``ORG--NAME@REV``), which is also the last part of that directory's path."""
    from loraplane.common.model_ref import ModelRefError, is_reference, parse_model_ref

    names = {value.rstrip("/")}
    try:
        if is_reference(value):
            names.add(parse_model_ref(value, revision=revision).dir_name())
        elif "@" in Path(value).name:
            names.add(Path(value).name)
    except ModelRefError:
        pass
    return names


def _check_same_base(
    config: TrainJobConfig, ref: str, manifest: dict[str, Any], adapter_config: dict[str, Any]
) -> None:
    """Refuse an adapter trained on another base model: by the files' digest when both are known (the
    trainer's view), else by the model's names (its path, the reference it was fetched from)."""
    from loraplane.trainer.checkpoints import base_model_files_digest

    recorded = manifest.get("base_model") or {}
    theirs_digest = recorded.get("files_sha256")
    ours = config.base_model.path
    ours_digest = base_model_files_digest(ours)
    by_files = bool(theirs_digest and ours_digest)
    if by_files:
        same = theirs_digest == ours_digest
    else:
        theirs = [
            str(name)
            for name in (
                recorded.get("path"),
                recorded.get("source"),
                adapter_config.get("base_model_name_or_path"),
            )
            if name
        ]
        ours_names = _model_names(ours, config.base_model.revision)
        same = not theirs or any(_same_path(name, ours) or _model_names(name) & ours_names for name in theirs)
    if not same:
        theirs_path = recorded.get("path") or adapter_config.get("base_model_name_or_path")
        how = "their config.json / weight files differ" if by_files else "by its recorded name and source"
        raise InvalidInputError(
            f"base_adapter: {ref} was trained on base model {theirs_path!r}, not on this job's "
            f"base_model.path {ours!r} ({how})",
            hint="set base_model.path to the model the adapter was trained on, or start from another adapter",
        )


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _lora_of(config: TrainJobConfig, ref: str, adapter_config: dict[str, Any]) -> LoraSpec:
    """The adapter's LoRA shape; an explicit ``lora`` section must agree with it."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise InvalidInputError(f"base_adapter: {ref} is a {adapter_config['peft_type']} adapter, not LoRA")
    targets = adapter_config.get("target_modules") or "all-linear"
    shape = {
        "r": int(adapter_config.get("r", 8)),
        "alpha": float(adapter_config.get("lora_alpha", 8)),
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
    }
    if "lora" in config.model_fields_set:
        mine = config.lora
        diffs = [
            f"lora.{key}: this config has {getattr(mine, key)!r}, {ref} has {shape[key]!r}"
            for key in ("r", "alpha", "use_rslora")
            if key in mine.model_fields_set and getattr(mine, key) != shape[key]
        ]
        if (
            "target_modules" in mine.model_fields_set
            and isinstance(mine.target_modules, list)
            and sorted(mine.target_modules) != shape["target_modules"]
        ):
            diffs.append(
                f"lora.target_modules: this config has {mine.target_modules!r}, {ref} has {targets!r}"
            )
        if diffs:
            raise InvalidInputError(
                "base_adapter: DPO continues the adapter's own LoRA, so its shape cannot change:\n  "
                + "\n  ".join(diffs),
                hint="remove those lora settings (the adapter's are used) or match them",
            )
    try:
        return LoraSpec(
            r=shape["r"],
            alpha=shape["alpha"],
            dropout=config.lora.dropout,
            use_rslora=shape["use_rslora"],
            target_modules=shape["target_modules"],
        )
    except ValueError as exc:
        raise LoraplaneError(f"base_adapter: {ref} has a LoRA shape loraplane cannot train: {exc}") from None


def dpo_args(config: TrainJobConfig, output_dir: Path, *, has_eval: bool, **overrides: Any) -> Any:
    from trl import DPOConfig

    from loraplane.trainer.sft import common_args

    kwargs = common_args(config, output_dir, has_eval=has_eval)
    kwargs.update(
        {
            "max_length": config.training.max_seq_length,
            "beta": config.dpo.beta,
            "loss_type": [config.dpo.loss_type],
            "label_smoothing": config.dpo.label_smoothing,
        }
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def _trainer_class() -> type:
    from trl import DPOTrainer

    from loraplane.trainer.batching import GroupedByLengthSampler
    from loraplane.trainer.sft import CompleteCheckpoints

    class LoraplaneDPOTrainer(CompleteCheckpoints, DPOTrainer):  # type: ignore[misc]
        """DPOTrainer with length-grouped batches and checkpoints marked complete only when whole."""

        loraplane_batching: str = "grouped"

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.loraplane_batching == "grouped" and dataset is not None:
                lengths = [
                    len(p) + max(len(c), len(r))
                    for p, c, r in zip(
                        dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
                    )
                ]
                return GroupedByLengthSampler(lengths, self.args.per_device_train_batch_size, self.args.seed)
            return super()._get_train_sampler(train_dataset)

    return LoraplaneDPOTrainer


def to_preference_dataset(examples: Sequence[TokenizedExample]) -> Any:
    from datasets import Dataset

    from loraplane.trainer.preference_data import PreferenceExample

    records = []
    for example in examples:
        assert isinstance(example, PreferenceExample), "method: dpo prepares preference pairs"
        records.append(example.to_record())
    return Dataset.from_list(records)


def build_trainer(
    config: TrainJobConfig,
    tokenizer: Any,
    train: Sequence[TokenizedExample],
    evaluation: Sequence[TokenizedExample] | None,
    output_dir: Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    base_adapter: BaseAdapter | None = None,
    **arg_overrides: Any,
) -> Any:
    from transformers import PrinterCallback

    from loraplane.trainer.sft import load_model, peft_config

    args = dpo_args(config, output_dir, has_eval=bool(evaluation), **arg_overrides)
    model = load_model(config)
    lora = None
    if base_adapter is not None:
        from peft import PeftModel

        # Trainable copy of the adapter; trl adds a frozen "ref" copy of it as the reference policy.
        model = PeftModel.from_pretrained(model, str(base_adapter.path), is_trainable=True)
    else:
        lora = peft_config(config)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=to_preference_dataset(train),
        eval_dataset=to_preference_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
    trainer.loraplane_batching = config.training.batching
    trainer.loraplane_keep_last = config.checkpoints.keep_last
    trainer.remove_callback(PrinterCallback)
    return trainer


# What the manifest keeps of trl's DPO logs (the last logged value of each).
DPO_LOGGED = {
    "rewards/accuracies": "final_reward_accuracy",
    "rewards/margins": "final_reward_margin",
    "rewards/chosen": "final_reward_chosen",
    "rewards/rejected": "final_reward_rejected",
}


def dpo_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The last training values of DPO's implicit-reward metrics, for the manifest."""
    out: dict[str, float] = {}
    for entry in history:
        for key, name in DPO_LOGGED.items():
            if key in entry and "loss" in entry:
                out[name] = float(entry[key])
    return out
