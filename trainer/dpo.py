"""``method: dpo``: preference tuning with trl's ``DPOTrainer``, on the SFT path's rails.

Everything around the trainer is the SFT run's (``loraplane.trainer.train``): the data checks
(:mod:`~loraplane.trainer.preference_data` through ``prepare_datasets``), the run directory, resume,
SIGTERM, checkpoint markers and retention (:class:`~loraplane.trainer.sft.CompleteCheckpoints`) and the
atomic publish with its manifest. This module adds what differs:

* :func:`resolve_base_adapter`: ``base_adapter: NAME@vN`` through the registry (the weights must still
  match the sha256 recorded at registration), on the same base model, with its LoRA shape;
* :func:`build_trainer`: the DPO trainer. Starting from a base adapter, that adapter is both the
  starting LoRA weights and the frozen reference (trl copies it into a ``ref`` adapter); otherwise a
  fresh LoRA is trained and the reference is the base model (adapter disabled).

The resolution is cheap (no torch); the trainer part imports torch/trl when called.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.trainer.config import LoraSpec, TrainJobConfig

if TYPE_CHECKING:
    from transformers import TrainerCallback

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


def resolve_base_adapter(config: TrainJobConfig) -> tuple[TrainJobConfig, BaseAdapter | None]:
    """Look ``config.base_adapter`` up in the registry; return the config with the adapter's LoRA shape.

    Raises InvalidInputError (exit 2) naming ``base_adapter`` when the version is unknown, was trained
    on another base model, or has another LoRA shape than an explicit ``lora`` section; IntegrityError
    (exit 3) when its weights changed since registration.
    """
    ref = config.base_adapter
    if ref is None:
        return config, None
    from loraplane.common.settings import Settings
    from loraplane.registry.backends import open_registry
    from loraplane.registry.model import RegistryError, verify_weights

    settings = Settings()
    where = f"at {settings.home}" if settings.registry == "local" else f"namespace {settings.namespace}"
    try:
        entry = open_registry(settings).read().resolve(ref)
    except (RegistryError, InvalidInputError) as exc:
        raise InvalidInputError(
            f"base_adapter: {ref!r} is not in the registry ({settings.registry} registry {where}): "
            f"{exc.message}",
            hint="register the SFT adapter first (loraplane adapters register PATH), and run the trainer "
            "with the same LORAPLANE_HOME / LORAPLANE_REGISTRY as the CLI",
        ) from None
    verify_weights(entry)
    path = Path(entry.path)
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"base_adapter: {ref}: cannot read {path / 'adapter_config.json'}: {exc}"
        ) from None
    manifest = entry.manifest or _read_manifest(path)
    _check_same_base(config, ref, manifest, adapter_config)
    lora = _lora_of(config, ref, adapter_config)
    adapter = BaseAdapter(
        ref=entry.ref,
        path=path,
        weights_sha256=entry.weights_sha256,
        method=str(manifest.get("method") or "sft"),
        run_id=manifest.get("run_id"),
    )
    log.info("starting from a registered adapter", extra={"base_adapter": entry.ref, "path": str(path)})
    return config.model_copy(update={"lora": lora}), adapter


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_same_base(
    config: TrainJobConfig, ref: str, manifest: dict[str, Any], adapter_config: dict[str, Any]
) -> None:
    from loraplane.trainer.checkpoints import base_model_files_digest

    recorded = manifest.get("base_model") or {}
    theirs_digest = recorded.get("files_sha256")
    ours_digest = base_model_files_digest(config.base_model.path)
    if theirs_digest and ours_digest:
        same = theirs_digest == ours_digest
    else:
        theirs = recorded.get("path") or adapter_config.get("base_model_name_or_path")
        same = theirs is None or _same_path(str(theirs), config.base_model.path)
    if not same:
        theirs_path = recorded.get("path") or adapter_config.get("base_model_name_or_path")
        raise InvalidInputError(
            f"base_adapter: {ref} was trained on base model {theirs_path!r}, not on this job's "
            f"base_model.path {config.base_model.path!r} (their config.json / weight files differ)",
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
