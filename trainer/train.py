"""Supervised LoRA fine-tuning with trl + peft, and publishing of the adapter.

The adapter is written to a staging directory and renamed to ``<adapters root>/<name>/<version>/``
only when every file is complete, so a crash or Ctrl-C never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplane import __version__
from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import sha256_file, staged_directory
from loraplane.trainer.config import TrainJobConfig
from loraplane.trainer.data import load_chat_jsonl

log = logging.getLogger("loraplane.trainer")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")

ProgressCallback = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class PublishedAdapter:
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]


def next_version(adapters_root: Path, name: str) -> str:
    """``v1`` for a new adapter, else one more than the highest published ``vN``."""
    existing = [p.name for p in (adapters_root / name).glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max((int(v[1:]) for v in existing), default=0) + 1}"


def _resolve_target(config: TrainJobConfig) -> tuple[str, Path]:
    out = config.output
    version = out.version or next_version(out.adapters_root, out.name)
    target = out.adapters_root / out.name / version
    if target.exists():
        raise InvalidInputError(
            f"adapter {out.name}@{version} already exists at {target}",
            hint="published versions are immutable: leave output.version unset to get the next free one",
        )
    return version, target


def _load_tokenizer(config: TrainJobConfig) -> Any:
    from transformers import AutoTokenizer

    spec = config.base_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"base_model.path: cannot load a tokenizer from {spec.path!r}: {exc}",
            hint="give a local model directory or a hub id (set HF_TOKEN for gated models)",
        ) from None
    if not tokenizer.chat_template:
        raise InvalidInputError(
            f"base_model.path: {spec.path!r} has no chat template",
            hint="use an instruct/chat variant of the model, or a tokenizer that defines chat_template",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_dtype(config: TrainJobConfig, use_cuda: bool) -> Any:
    import torch

    name = config.base_model.dtype
    if name == "auto":
        return torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _progress_callback(on_log: ProgressCallback | None) -> Any:
    """A TrainerCallback that reports progress as structured log lines (and to ``on_log``)."""
    from transformers import TrainerCallback

    def emit(state: Any, logs: dict[str, float]) -> None:
        event = {"step": float(state.global_step), "max_steps": float(state.max_steps), **logs}
        log.info("train progress", extra={k: v for k, v in event.items() if isinstance(v, int | float)})
        if on_log is not None:
            on_log(event)

    class _Progress(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            emit(state, {})  # announces max_steps before the first step

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs:
                emit(state, logs)

    return _Progress()


def train_and_publish(config: TrainJobConfig, *, on_log: ProgressCallback | None = None) -> PublishedAdapter:
    """Validate the data, fine-tune, and publish ``<adapters_root>/<name>/<version>/``."""
    version, target = _resolve_target(config)
    # Cheap checks first: nothing heavy is loaded until the data is known to be usable.
    train_rows = load_chat_jsonl(config.dataset.path)
    eval_rows = load_chat_jsonl(config.dataset.eval_path) if config.dataset.eval_path else None

    import datasets
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    use_cuda = torch.cuda.is_available()
    tokenizer = _load_tokenizer(config)
    spec = config.base_model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            dtype=_model_dtype(config, use_cuda),
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"base_model.path: cannot load a model from {spec.path!r}: {exc}") from None

    t = config.training
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory(prefix="loraplane-run-") as tmp:
        run_dir = config.output.run_dir or Path(tmp)
        args = SFTConfig(
            output_dir=str(run_dir),
            learning_rate=t.learning_rate,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            warmup_steps=t.warmup_ratio,
            lr_scheduler_type=t.lr_scheduler,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            max_length=t.max_seq_length,
            assistant_only_loss=t.assistant_only_loss,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            eval_strategy="epoch" if eval_rows else "no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not use_cuda,
            bf16=model.dtype == torch.bfloat16,
            dataloader_num_workers=0,
        )
        started = time.monotonic()
        try:
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list([{"messages": m} for m in train_rows]),
                eval_dataset=Dataset.from_list([{"messages": m} for m in eval_rows]) if eval_rows else None,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[_progress_callback(on_log)],
            )
            trainer.remove_callback(PrinterCallback)  # progress goes through our callback and logger
            result = trainer.train()
        except ValueError as exc:  # trl/peft reject bad settings (e.g. unknown target modules)
            raise LoraplaneError(f"training failed: {exc}") from exc
        seconds = time.monotonic() - started
        metrics: dict[str, float] = {
            "train_loss": float(result.training_loss),
            "train_seconds": round(seconds, 2),
            "steps": float(result.global_step),
        }
        if eval_rows:
            eval_metrics = trainer.evaluate()
            metrics["eval_loss"] = float(eval_metrics["eval_loss"])
        if not math.isfinite(metrics["train_loss"]):
            raise LoraplaneError(
                f"training diverged (train_loss={metrics['train_loss']}); nothing was published",
                hint="lower training.learning_rate",
            )

        with staged_directory(target) as staging:
            trainer.model.save_pretrained(str(staging), safe_serialization=True)
            (staging / "README.md").unlink(missing_ok=True)
            manifest = _manifest(config, version, metrics, staging)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("published adapter", extra={"adapter": f"{config.output.name}@{version}", "path": str(target)})
    return PublishedAdapter(name=config.output.name, version=version, path=target, manifest=manifest)


def _manifest(
    config: TrainJobConfig, version: str, metrics: dict[str, float], staging: Path
) -> dict[str, Any]:
    import torch

    weights = staging / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraplaneError(
            f"peft did not write {weights.name}; refusing to publish an adapter without weights"
        )
    return {
        "schema": "loraplane.adapter-manifest/v1",
        "name": config.output.name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {"path": config.base_model.path, "revision": config.base_model.revision},
        "dataset": {
            "path": str(config.dataset.path),
            "sha256": sha256_file(config.dataset.path),
            "eval_path": str(config.dataset.eval_path) if config.dataset.eval_path else None,
            "eval_sha256": sha256_file(config.dataset.eval_path) if config.dataset.eval_path else None,
        },
        "lora": config.lora.model_dump(mode="json"),
        "training": config.training.model_dump(mode="json"),
        "metrics": metrics,
        "weights_sha256": sha256_file(weights),
        "environment": {
            "loraplane": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": os.uname().nodename,
        },
    }
