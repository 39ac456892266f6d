"""The model, the arguments and the trl ``SFTTrainer`` that loraplane trains with.

Imported lazily (it pulls in torch, transformers, peft and trl). ``build_trainer`` is also what the
training benchmark uses for its "our trainer" arms, so the benchmark measures the shipped code path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from loraplane.common.errors import InvalidInputError
from loraplane.trainer.batching import GroupedByLengthSampler
from loraplane.trainer.checkpoints import RunState, apply_retention, mark_complete
from loraplane.trainer.config import TrainJobConfig
from loraplane.trainer.data import TokenizedExample

log = logging.getLogger("loraplane.trainer")

# Progress goes through loraplane's own reporting; library bars and notices would flood a pod's log.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def check_hardware(config: TrainJobConfig, *, world_size: int) -> None:
    """Refuse settings this machine cannot run, before anything is loaded."""
    cuda = cuda_available()
    quant = config.base_model.quantization
    if quant != "none":
        if not cuda:
            raise InvalidInputError(
                f"base_model.quantization: {quant!r} (QLoRA) needs a CUDA GPU and none is visible",
                hint="set base_model.quantization=none to train the LoRA in full precision, "
                "or run the job on a GPU node",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InvalidInputError(
                f"base_model.quantization: {quant!r} needs the bitsandbytes package",
                hint="pip install bitsandbytes (the GPU trainer image ships it)",
            )
    if config.distributed.strategy == "fsdp" and world_size > 1 and not cuda:
        raise InvalidInputError(
            "distributed.strategy: 'fsdp' needs CUDA GPUs; this run has none",
            hint="use distributed.strategy=ddp for CPU (gloo) runs",
        )


def model_dtype(config: TrainJobConfig) -> torch.dtype:
    name = config.base_model.dtype
    if name == "auto":
        cuda = cuda_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _attention(config: TrainJobConfig) -> str:
    # Packed rows keep their sequence boundaries through position ids: FlashAttention-2 uses them as
    # varlen boundaries; SDPA/eager get a block-diagonal mask from transformers (correct, not faster).
    if (
        config.training.batching == "packed"
        and cuda_available()
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def load_model(config: TrainJobConfig) -> Any:
    spec = config.base_model
    kwargs: dict[str, Any] = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": model_dtype(config),
        "attn_implementation": _attention(config),
    }
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"base_model.path: cannot load a model from {spec.path!r}: {exc}") from None
    if spec.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    # Without a KV cache in training, transformers derives block-diagonal masks from position ids, which is
    # what keeps packed examples from attending to each other.
    model.config.use_cache = False
    return model


def peft_config(config: TrainJobConfig) -> LoraConfig:
    lora = config.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def training_args(config: TrainJobConfig, output_dir: Path, *, has_eval: bool, **overrides: Any) -> SFTConfig:
    t = config.training
    kwargs = common_args(config, output_dir, has_eval=has_eval)
    kwargs.update(
        {"max_length": t.max_seq_length, "packing": t.batching == "packed", "packing_strategy": "bfd"}
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def common_args(config: TrainJobConfig, output_dir: Path, *, has_eval: bool) -> dict[str, Any]:
    """The Trainer arguments every method shares (steps, optimizer, checkpoints, devices, logging)."""
    t = config.training
    cuda = cuda_available()
    dtype = model_dtype(config)
    every = config.checkpoints.every_steps
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "warmup_steps": t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "lr_scheduler_type": t.lr_scheduler,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "gradient_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "eval_strategy": "epoch" if has_eval else "no",
        "save_strategy": "steps" if every else "no",
        "save_steps": every or 500,
        "save_total_limit": None,  # retention is ours: it never deletes the checkpoint resumed from
        "include_num_input_tokens_seen": "non_padding",
        # transformers' own integrations (TensorBoard, MLflow, W&B); loraplane.trainer.tracking sets
        # up where they write and the runs they log to
        "report_to": config.tracking.report_to() or "none",
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "dataloader_num_workers": 0,
    }
    if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["ddp_backend"] = "gloo"  # torchrun on CPU
    if config.distributed.strategy == "fsdp" and cuda:
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = {"use_orig_params": True}
    return kwargs


def to_dataset(examples: Sequence[TokenizedExample]) -> Dataset:
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )


class CompleteCheckpoints:
    """Mixed into a trl trainer: checkpoints are marked complete only when whole, old ones retired.

    Shared by :class:`LoraplaneSFTTrainer` and the DPO trainer (``loraplane.trainer.dpo``)."""

    loraplane_run: RunState | None = None
    loraplane_keep_last: int = 2
    loraplane_protect: Path | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        self._mark_checkpoint(trial)

    def _mark_checkpoint(self, trial: Any) -> None:
        trainer: Any = self
        if self.loraplane_run is None:
            return
        # Every rank has written its part (its RNG state at least); only then is the checkpoint whole.
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            run_dir = Path(trainer._get_output_dir(trial))
            step = trainer.state.global_step
            mark_complete(run_dir / f"checkpoint-{step}", step=step, run=self.loraplane_run)
            apply_retention(run_dir, keep_last=self.loraplane_keep_last, protect=self.loraplane_protect)
        trainer.accelerator.wait_for_everyone()


class LoraplaneSFTTrainer(CompleteCheckpoints, SFTTrainer):  # type: ignore[misc]
    """SFTTrainer with length-grouped batches, and checkpoints that are marked complete only when whole."""

    loraplane_batching: str = "grouped"

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.loraplane_batching == "grouped" and dataset is not None:
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return GroupedByLengthSampler(lengths, self.args.per_device_train_batch_size, self.args.seed)
        return super()._get_train_sampler(train_dataset)


def build_trainer(
    config: TrainJobConfig,
    tokenizer: Any,
    train: Sequence[TokenizedExample],
    evaluation: Sequence[TokenizedExample] | None,
    output_dir: Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    model: Any = None,
    **arg_overrides: Any,
) -> LoraplaneSFTTrainer:
    args = training_args(config, output_dir, has_eval=bool(evaluation), **arg_overrides)
    trainer = LoraplaneSFTTrainer(
        model=model if model is not None else load_model(config),
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config(config),
        callbacks=list(callbacks),
    )
    trainer.loraplane_batching = config.training.batching
    trainer.loraplane_keep_last = config.checkpoints.keep_last
    trainer.remove_callback(PrinterCallback)  # progress goes through our callback and logger
    return trainer
