"""GPU training benchmark (issue 25): loraplane's trainer against plain HF Trainer + peft, on one GPU.

Numbers, not a test. One run trains the same LoRA on the same data with several arms, one after
another in this process, and writes ``gpu-train-<UTC date-time>-<device>.json`` and ``.md`` into
``--out`` (default ``bench/results/``), rewritten after every arm, so a crash keeps what was done.
Safe to rerun: every run writes new files. Sized for under 8 minutes on an H100/H200 (not measured
yet): an arm stops after ``--arm-seconds`` (30) of measured steps or three times that in all, and the
arms still left after ``--budget-s`` (360) seconds are skipped.

How to run it
=============

On a machine with a CUDA GPU and this project's virtual environment (``make setup``)::

    .venv/bin/python bench/gpu_train.py                 # results in bench/results/
    .venv/bin/python bench/gpu_train.py --check         # only: which libraries import, which GPU

On a GPU machine *without* the project installed (a plain copy of the working tree, a Python that has
torch, transformers, peft and accelerate, no network), run it from the repository root exactly like
that: the script registers the repository root as the package ``loraplane`` itself when that is not
importable (the root *is* the package, ``package-dir = {"loraplane" = "."}`` in pyproject.toml).
Never put the repository root on ``PYTHONPATH``: its ``platform/`` folder would shadow the stdlib.

loraplane's trainer needs trl, datasets and pydantic, which such a machine may lack (the plain arms
need none of them: their absence skips only our arms, with the reason in the report). Carry them as
wheels (about 5 MiB; bitsandbytes for the QLoRA arm is 43 MiB more, still within a 64 MiB working
tree). On a machine with pip and PyPI, from the repository root (``.whl/`` must be git-ignored, e.g.
``echo /.whl/ >> .git/info/exclude``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \\
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
      trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.3 \\
      pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \\
      liger-kernel==0.8.5 bitsandbytes==0.50.2

(versions: the project's lock; ``--python-version`` that of the GPU machine's Python). Then on the GPU
machine, from the repository root (``$OUT``: a folder whose files come back, else leave ``--out`` out)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_train.py --out "$OUT"

datasets 5.2 wants pyarrow >= 24 and fsspec <= 2026.9.0; if ``--check`` reports datasets not importing
because of them, carry those wheels too. flash-attn has no wheel on PyPI (it builds from source for
an hour): without it the FlashAttention-2 arm is skipped and FlexAttention is the padding-free path.

``--dry-run`` runs every arm on the CPU with the tiny demo model (a few steps of 128-token rows),
through the same code (arms, checks, reports), in well under a minute on 2 cores: it is what
``tests/test_bench_gpu_train.py`` runs, so the script works the first time it meets a GPU.

What it measures
================

Model: a random-init Llama built locally by ``loraplane.trainer.demo_model.build_demo_model`` (the
demo model's recipe, no download) at ``--model llama-1b`` (default: Llama-3.2-1B's shape, 16 layers x
2048, 32 heads of 64, 8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings: 1.24B parameters)
or ``qwen-0.5b`` (Qwen2.5-0.5B's shape on the Llama architecture: 24 x 896, 14 heads, 2 KV heads, MLP
4864, vocabulary 151,936, tied: 0.49B), written in bf16 into ``--workdir`` and reused by later runs.
bf16, LoRA r=16 alpha=32 on all linear layers, no dropout, AdamW lr 2e-4 with linear decay, batch 8,
max length 2048, no gradient checkpointing, one epoch over ``--examples`` (1024) examples.

Data: ``bench/train_throughput.py``'s synthetic chat-like recipe (its ``make_examples``: the first 20-60%
of each example is an untrained prompt, the rest an answer from a fixed bigram table, ended by EOS),
with log-normal lengths of mean 0.3 x max length (614 tokens), sigma 0.6, clipped to [64, 2048].

Arms (in this order; an arm that cannot run here is skipped with its reason in the report):

* **A**: ``transformers.Trainer`` + ``peft.get_peft_model``, random batches padded to the longest
  (``DataCollatorForSeq2Seq``), SDPA. No trl.
* **A2**: A + ``train_sampling_strategy="group_by_length"`` (transformers' length-grouped sampler).
* **B0**: ``loraplane.trainer.sft.build_trainer`` with ``training.batching=padded`` (same batches as A).
* **B**: ``build_trainer`` as shipped (``training.batching=grouped``).
* **B-packed**: ``training.batching=packed`` (BFD packing into 2048-token rows, padding-free; the
  attention the trainer picks: FlashAttention-2 when flash_attn imports, else SDPA, which gets a dense
  block-diagonal mask over the flattened batch: correct, not fast).
* **B-fa2**: B with ``attn_implementation="flash_attention_2"`` (needs flash_attn).
* **B-packed-flex**: B-packed with ``attn_implementation="flex_attention"`` (block-sparse masks from
  the packed position ids, torch.compile'd: its compile falls in the warm-up steps; CUDA only).
* **B-qlora**: B with the base model in 4-bit NF4 (``base_model.quantization=nf4``; needs bitsandbytes).
* **B-liger**: the fastest measured B arm + ``use_liger_kernel=True`` (Liger's RMSNorm, SwiGLU and RoPE
  Triton kernels; needs liger_kernel). Last, since Liger patches transformers' Llama module globally.

Metrics, per arm: a callback synchronises the GPU and stamps the end of every optimizer step; the
first ``--warmup-steps`` (3) steps are left out (and before the first arm, a few discarded steps of A
pay the process's one-time CUDA costs). **tok/s** = non-padding tokens of the measured steps /
their time (every token of an example goes forward and backward, prompt included); **loss tok/s**
counts only the tokens with a label (what ``bench/train_throughput.py`` calls tok/s). **MFU_4N** = 4 x N
x tok/s / the device's dense bf16 peak, N = the base model's parameter count (unique tensors,
embeddings included, as Llama-2-7B is usually counted at 6.74e9: forward 2N + input
gradients 2N; attention FLOPs and the LoRA matrices' 6 N_lora are left out, so MFU_4N understates
the work a little). Peaks come from the table ``PEAK_BF16_TFLOPS`` by ``torch.cuda.get_device_name``,
or ``--peak-tflops``. **peak GPU memory** = ``torch.cuda.max_memory_allocated`` from model load to
the end of training (None on the CPU). An arm stopped by ``--arm-seconds`` says so in its notes;
checks: the loss is finite, the minimum grad norm and the LoRA B matrices are non-zero.

Ratios: B/A = the fastest measured loraplane arm over A (also over A2, and B0/A). Goals from the issue
(reported, not asserted): MFU_4N >= 50% on an H200-class GPU (H100/H200), B/A >= 1.5.

    .venv/bin/python bench/gpu_train.py [--dry-run] [--out DIR] [--workdir DIR] [--model llama-1b]
        [--arms A,A2,B0,B,...] [--examples N] [--seq-len N] [--batch-size N] [--peak-tflops T]

Exit status: 0 every arm that could run was measured and passed its checks; 1 an arm failed or a check
did not hold (the report says which); 2 bad usage (no CUDA GPU without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # for train_throughput's data helpers (bench/ is not a package)

SCHEMA = "loraplane.bench.gpu_train/1"
SEED = 0
LORA_R = 16
LORA_ALPHA = 32
LEARNING_RATE = 2e-4
MEAN_LENGTH_SHARE = 0.3  # log-normal mean length as a share of the max length
SIGMA = 0.6
MFU_GOAL = 0.50
RATIO_GOAL = 1.5
H200_CLASS = ("H100 SXM", "H100 NVL", "H100 PCIe", "H200", "H200 NVL", "GH200")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched in order against
# torch.cuda.get_device_name(): more specific names first ("L40S" before "L4", "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("GH200", "GH200", 989.0),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200", 989.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),  # "NVIDIA H100 80GB HBM3"
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.0),
    ("L40", "L40", 181.0),
    ("L4", "L4", 121.0),
    ("RTX 4090", "RTX 4090", 165.2),
)

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's shape: 1.24B parameters.
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "padded_vocab_size": 128256,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    },
    # Qwen2.5-0.5B's shape (without its q/k/v biases): 0.49B parameters.
    "qwen-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "padded_vocab_size": 151936,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    },
    "tiny": {},  # the demo model itself (2 layers x 128): the dry run's
}

# What the device machine may lack, and why the benchmark wants it.
OPTIONAL = {
    "trl": "loraplane's trainer (trl.SFTTrainer)",
    "datasets": "loraplane's trainer and trl",
    "pydantic": "loraplane's training config",
    "flash_attn": "the FlashAttention-2 arm",
    "liger_kernel": "the Liger arm",
    "bitsandbytes": "the QLoRA arm",
}
VERSIONED = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "numpy")


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ bootstrap


def ensure_loraplane() -> str:
    """Make ``import loraplane`` work from a plain checkout: register the repository root as the package."""
    if importlib.util.find_spec("loraplane") is not None:
        return "installed"
    spec = importlib.util.spec_from_file_location(
        "loraplane", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {REPO / '__init__.py'} as the package loraplane")
    module = importlib.util.module_from_spec(spec)
    sys.modules["loraplane"] = module
    spec.loader.exec_module(module)
    return f"registered from {REPO}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_import(module: str) -> str | None:
    """None when ``module`` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a library that breaks while importing
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def environment(*, cuda: bool) -> dict[str, Any]:
    import torch

    versions: dict[str, str | None] = {name: _version(name) for name in VERSIONED}
    versions["python"] = sys.version.split()[0]
    versions["cuda"] = torch.version.cuda
    optional: dict[str, dict[str, Any]] = {}
    for module, purpose in OPTIONAL.items():
        problem = probe_import(module)
        dist = {"flash_attn": "flash-attn", "liger_kernel": "liger-kernel"}.get(module, module)
        optional[module] = {"importable": problem is None, "problem": problem, "for": purpose}
        versions[module] = _version(dist)
    ours = probe_import("loraplane.trainer.sft")
    return {
        "versions": versions,
        "optional": optional,
        "loraplane_trainer": {"importable": ours is None, "problem": ours},
        "cuda_available": cuda,
    }


# --------------------------------------------------------------------------------------------- device


@dataclass
class Device:
    kind: Literal["cuda", "cpu"]
    name: str
    slug: str
    peak_bf16_tflops: float | None
    peak_source: str | None
    h200_class: bool
    total_memory_gib: float | None = None
    capability: str | None = None


def peak_for(name: str) -> tuple[str, float] | None:
    for needle, label, tflops in PEAK_BF16_TFLOPS:
        if needle.lower() in name.lower():
            return label, tflops
    return None


def detect_device(peak_override: float | None) -> Device:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        found = peak_for(name)
        peak, source = (found[1], f"table: {found[0]}") if found else (None, None)
        label = found[0] if found else ""
        device = Device(
            kind="cuda",
            name=name,
            slug=re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "cuda",
            peak_bf16_tflops=peak,
            peak_source=source,
            h200_class=label in H200_CLASS,
            total_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
        )
    else:
        device = Device("cpu", "cpu", "cpu", None, None, h200_class=False)
    if peak_override is not None:
        device.peak_bf16_tflops, device.peak_source = peak_override, "--peak-tflops"
    return device


# ----------------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    stack: Literal["plain", "ours"]
    batching: Literal["padded", "grouped", "packed"]
    attention: str | None = None  # None: the stack's own choice (plain: sdpa; ours: load_model's)
    liger: bool = False
    quantization: Literal["none", "nf4"] = "none"


ARMS: tuple[Arm, ...] = (
    Arm("A", "HF Trainer + peft, random batches padded to the longest", "plain", "padded"),
    Arm("A2", "A + transformers' group_by_length sampler", "plain", "grouped"),
    Arm("B0", "loraplane build_trainer, batching=padded (overhead check)", "ours", "padded"),
    Arm("B", "loraplane build_trainer as shipped (batching=grouped)", "ours", "grouped"),
    Arm("B-packed", "batching=packed: BFD rows, padding-free, attention as shipped", "ours", "packed"),
    Arm("B-fa2", "B with flash_attention_2", "ours", "grouped", attention="flash_attention_2"),
    Arm("B-packed-flex", "B-packed with flex_attention", "ours", "packed", attention="flex_attention"),
    Arm("B-qlora", "B with the base in 4-bit NF4 (QLoRA)", "ours", "grouped", quantization="nf4"),
    Arm("B-liger", "the fastest B arm + Liger kernels", "ours", "grouped", liger=True),
)


@dataclass
class ArmResult:
    name: str
    what: str
    stack: str
    batching: str
    status: Literal["measured", "skipped", "failed"]
    reason: str | None = None
    attention: str | None = None
    liger: bool = False
    quantization: str = "none"
    gpu_mem_at_start_gib: float | None = None  # allocated before the arm's model loads (leak check)
    tokens_per_s: float | None = None  # non-padding tokens of the measured steps per second
    loss_tokens_per_s: float | None = None  # tokens with a label, per second
    whole_run_tokens_per_s: float | None = None  # warm-up steps included
    mfu_4n: float | None = None
    peak_gpu_mem_gib: float | None = None
    steps: int | None = None
    measured_steps: int | None = None
    stopped_early: bool = False
    tokens: int | None = None  # non-padding tokens over all steps
    loss_tokens: int | None = None
    padding_fraction: float | None = None
    setup_s: float | None = None
    train_s: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    train_loss: float | None = None
    min_grad_norm: float | None = None
    lora_b_abs_sum: float | None = None
    problems: list[str] = field(default_factory=list)  # a check that did not hold (exit status 1)
    notes: list[str] = field(default_factory=list)  # about the measurement, e.g. an early stop
    step_s: list[float] = field(default_factory=list)
    traceback: str | None = None


@dataclass
class Context:
    model_dir: Path
    work: Path
    cuda: bool
    dtype_name: Literal["bfloat16", "float32"]
    n_params: int
    peak_tflops: float | None
    examples: list[Any]  # train_throughput.Example
    seq_len: int
    batch_size: int
    warmup_steps: int
    arm_seconds: float
    env: dict[str, Any]


def skip_reason(arm: Arm, ctx: Context) -> str | None:
    """Why this arm cannot run here (None: it can)."""
    optional = ctx.env["optional"]

    def missing(module: str, what: str) -> str | None:
        if optional[module]["importable"]:
            return None
        return f"{module} not installed on the device: {optional[module]['problem']}; {what}"

    if arm.stack == "ours" and not ctx.env["loraplane_trainer"]["importable"]:
        return (
            f"loraplane.trainer.sft not importable: {ctx.env['loraplane_trainer']['problem']}; carry the "
            "trl, datasets and pydantic wheels named at the top of bench/gpu_train.py"
        )
    if arm.attention == "flash_attention_2":
        if not ctx.cuda:
            return "flash_attention_2 needs a CUDA GPU; this run is on the CPU"
        return missing(
            "flash_attn", "it has no PyPI wheel (builds from source), carry one built for this torch"
        )
    if arm.attention == "flex_attention":
        if not ctx.cuda:
            return (
                "flex_attention needs a CUDA GPU for training (torch: no FlexAttention backward on the CPU)"
            )
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            return "transformers says flex_attention is not available with this torch"
    if arm.quantization != "none":
        cpu = "" if ctx.cuda else "; QLoRA also needs a CUDA GPU and this run is on the CPU"
        bnb = missing("bitsandbytes", "carry its wheel (bitsandbytes==0.50.2, 43 MiB)")
        if bnb is not None or cpu:
            return (bnb or "QLoRA needs a CUDA GPU and this run is on the CPU") + (cpu if bnb else "")
    if arm.liger:
        cpu = "" if ctx.cuda else "; Liger's Triton kernels also need a CUDA GPU and this run is on the CPU"
        liger = missing("liger_kernel", "carry its wheel (liger-kernel==0.8.5, under 1 MiB)")
        if liger is not None or cpu:
            return (liger or "Liger's Triton kernels need a CUDA GPU and this run is on the CPU") + (
                cpu if liger else ""
            )
    return None


class _Clock:
    """Trainer callback: wall-clock stamps at the end of every optimizer step (GPU synchronised)."""

    def __init__(self, cuda: bool, warmup_steps: int, arm_seconds: float) -> None:
        self.cuda = cuda
        self.warmup_steps = warmup_steps
        self.arm_seconds = arm_seconds
        self.begin = 0.0
        self.ends: list[float] = []
        self.stopped_early = False

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.begin = self._now()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        now = self._now()
        self.ends.append(now)
        w = self.warmup_steps
        measured = now - self.ends[w - 1] if w and len(self.ends) > w else now - self.begin
        # A slow arm must not eat the whole run: stop after arm_seconds of measured steps, or after a
        # warm-up (a compile, say) twice that long.
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if not last and (measured >= self.arm_seconds or now - self.begin >= 3 * self.arm_seconds):
            self.stopped_early = True
            control.should_training_stop = True
        return control


def _callback(clock: _Clock) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return clock.on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return clock.on_step_end(args, state, control, **kwargs)

    return Clock()


def _torch_dtype(ctx: Context) -> Any:
    import torch

    return getattr(torch, ctx.dtype_name)


def plain_trainer(arm: Arm, ctx: Context, out: Path, max_steps: int = -1) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        ctx.model_dir, dtype=_torch_dtype(ctx), attn_implementation=arm.attention or "sdpa"
    )
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    extra = {"train_sampling_strategy": "group_by_length"} if arm.batching == "grouped" else {}
    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        per_device_train_batch_size=ctx.batch_size,
        num_train_epochs=1,
        max_steps=max_steps,
        max_grad_norm=1.0,
        seed=SEED,
        bf16=ctx.dtype_name == "bfloat16",
        use_cpu=not ctx.cuda,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        **extra,
    )
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in ctx.examples],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def our_trainer(arm: Arm, ctx: Context, out: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from loraplane.trainer.config import load_config
    from loraplane.trainer.data import TokenizedExample
    from loraplane.trainer.sft import build_trainer, model_dtype

    config = load_config(
        None,
        [
            f"base_model.path={ctx.model_dir}",
            f"base_model.dtype={ctx.dtype_name}",
            f"base_model.quantization={arm.quantization}",
            f"dataset.path={out / 'unused.jsonl'}",
            f"output.adapters_root={out / 'adapters'}",
            "output.name=bench",
            f"lora.r={LORA_R}",
            f"lora.alpha={LORA_ALPHA}",
            "lora.dropout=0.0",
            "lora.target_modules=all-linear",
            f"training.learning_rate={LEARNING_RATE}",
            f"training.batch_size={ctx.batch_size}",
            f"training.max_seq_length={ctx.seq_len}",
            "training.epochs=1",
            f"training.seed={SEED}",
            "training.logging_steps=1",
            f"training.batching={arm.batching}",
            "tracking.tensorboard=false",  # as the reference arm's report_to="none"
        ],
    )
    train = [
        TokenizedExample(row=i + 1, input_ids=e.input_ids, labels=e.labels)
        for i, e in enumerate(ctx.examples)
    ]
    set_seed(SEED)
    model = None  # build_trainer loads it as the trainer does (load_model), attention and QLoRA included
    if arm.attention is not None:
        model = AutoModelForCausalLM.from_pretrained(
            ctx.model_dir, dtype=model_dtype(config), attn_implementation=arm.attention
        )
        model.config.use_cache = False
    overrides: dict[str, Any] = {"use_liger_kernel": True} if arm.liger else {}
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    return build_trainer(config, tokenizer, train, None, out, model=model, **overrides)


def _free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def warm_up(ctx: Context) -> dict[str, Any]:
    """A few discarded steps of arm A: the process's one-time costs (CUDA context, cuBLAS handles, kernel
    selection, lazy imports) are paid here rather than by whichever arm comes first."""
    import torch

    steps = ctx.warmup_steps + 1
    scratch = Path(tempfile.mkdtemp(prefix="warm-up-", dir=ctx.work))
    started = time.perf_counter()
    try:
        plain_trainer(ARMS[0], ctx, scratch, max_steps=steps).train()
        outcome: dict[str, Any] = {"arm": ARMS[0].name, "steps": steps, "status": "done"}
    except Exception as exc:  # the arms themselves will fail and say why
        outcome = {
            "arm": ARMS[0].name,
            "steps": steps,
            "status": f"failed: {type(exc).__name__}: {exc}"[:300],
        }
    finally:
        _free_memory(ctx.cuda)
        shutil.rmtree(scratch, ignore_errors=True)
    if ctx.cuda:
        torch.cuda.synchronize()
    outcome["seconds"] = time.perf_counter() - started
    return outcome


def run_arm(arm: Arm, ctx: Context) -> ArmResult:
    import torch
    from train_throughput import CountingCollator

    result = ArmResult(
        arm.name,
        arm.what,
        arm.stack,
        arm.batching,
        "measured",
        attention=arm.attention,
        liger=arm.liger,
        quantization=arm.quantization,
    )
    scratch = Path(tempfile.mkdtemp(prefix=f"arm-{arm.name}-", dir=ctx.work))
    trainer: Any = None
    try:
        _free_memory(ctx.cuda)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
            result.gpu_mem_at_start_gib = torch.cuda.memory_allocated() / 2**30
        started = time.perf_counter()
        trainer = plain_trainer(arm, ctx, scratch) if arm.stack == "plain" else our_trainer(arm, ctx, scratch)
        result.setup_s = time.perf_counter() - started
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        result.attention = str(base.config._attn_implementation)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        clock = _Clock(ctx.cuda, ctx.warmup_steps, ctx.arm_seconds)
        trainer.add_callback(_callback(clock))
        output = trainer.train()
        if ctx.cuda:
            result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        _measure(result, ctx, trainer, output, counter.batches, clock)
    except Exception as exc:  # an arm that breaks is reported; the others still run
        result.status = "failed"
        if ctx.cuda:  # an out-of-memory error says how far it got
            result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        result.reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        result.traceback = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        trainer = None
        _free_memory(ctx.cuda)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _measure(
    result: ArmResult,
    ctx: Context,
    trainer: Any,
    output: Any,
    batches: list[tuple[int, int, int]],
    clock: _Clock,
) -> None:
    steps = len(clock.ends)
    if steps == 0:
        raise RuntimeError("the trainer ran no optimizer step")
    batches = batches[:steps]  # the data loader may have collated one batch ahead of an early stop
    if len(batches) != steps:
        raise RuntimeError(f"{len(batches)} batches collated for {steps} optimizer steps")
    w = min(ctx.warmup_steps, steps - 1)
    start = clock.ends[w - 1] if w > 0 else clock.begin
    seconds = clock.ends[-1] - start
    measured = batches[w:]
    result.steps, result.measured_steps, result.stopped_early = steps, len(measured), clock.stopped_early
    result.tokens = sum(b[1] for b in batches)
    result.loss_tokens = sum(b[0] for b in batches)
    result.padding_fraction = 1 - result.tokens / sum(b[2] for b in batches)
    result.train_s = clock.ends[-1] - clock.begin
    result.tokens_per_s = sum(b[1] for b in measured) / seconds
    result.loss_tokens_per_s = sum(b[0] for b in measured) / seconds
    result.whole_run_tokens_per_s = result.tokens / result.train_s
    result.step_s = [round(b - a, 5) for a, b in zip([clock.begin, *clock.ends], clock.ends, strict=False)]
    if ctx.peak_tflops:
        result.mfu_4n = 4 * ctx.n_params * result.tokens_per_s / (ctx.peak_tflops * 1e12)
    history = trainer.state.log_history
    losses = [float(h["loss"]) for h in history if "loss" in h]
    grads = [float(h["grad_norm"]) for h in history if "grad_norm" in h]
    result.loss_first = losses[0] if losses else None
    result.loss_last = losses[-1] if losses else None
    result.train_loss = float(output.training_loss)
    result.min_grad_norm = min(grads) if grads else None
    result.lora_b_abs_sum = sum(
        float(p.detach().float().abs().sum()) for n, p in trainer.model.named_parameters() if "lora_B" in n
    )
    if not (_finite(result.train_loss) and _finite(result.loss_first) and _finite(result.loss_last)):
        result.problems.append(f"loss not finite: {result.loss_first} -> {result.loss_last}")
    if not (_finite(result.min_grad_norm) and (result.min_grad_norm or 0) > 0):
        result.problems.append(f"a zero or non-finite gradient norm: min {result.min_grad_norm}")
    if not result.lora_b_abs_sum > 0:
        result.problems.append("the LoRA B matrices are still zero after training")
    if w < ctx.warmup_steps:
        result.notes.append(f"only {steps} steps: the rate includes {'the' if w else 'no'} warm-up step(s)")
    if clock.stopped_early:
        result.notes.append(f"stopped after --arm-seconds {ctx.arm_seconds:.0f} ({steps} steps)")


# ------------------------------------------------------------------------------------------- the data


def make_data(n: int, seq_len: int, vocab: int) -> list[Any]:
    from train_throughput import make_examples

    rng = np.random.default_rng(SEED)
    mean = MEAN_LENGTH_SHARE * seq_len
    mu = math.log(mean) - SIGMA**2 / 2  # the log-normal's mean is then `mean`
    low = max(16, seq_len // 32)
    lengths = [int(x) for x in np.clip(np.round(rng.lognormal(mu, SIGMA, size=n)), low, seq_len)]
    return list(make_examples(n, vocab, SEED, lengths=lengths))


def build_model(work: Path, preset: str, seq_len: int) -> Path:
    """The preset's model in ``work`` (built once: the directory name carries the spec's hash)."""
    from loraplane.trainer.demo_model import DemoModelSpec, build_demo_model

    fields = dict(PRESETS[preset])
    fields["max_position_embeddings"] = max(seq_len, DemoModelSpec().max_position_embeddings)
    spec = DemoModelSpec(**fields)
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    model_dir = work / f"model-{preset}-{digest}"
    if not (model_dir / "loraplane-demo.json").is_file():
        with contextlib.suppress(FileExistsError):  # another run built it meanwhile
            build_demo_model(model_dir, spec)
    return model_dir


def count_params(model_dir: Path) -> tuple[int, dict[str, Any]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())  # tied tensors once
    shape = {
        key: getattr(config, key, None)
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "tie_word_embeddings",
        )
    }
    return int(n), shape


# ------------------------------------------------------------------------------------------- reports


def _fmt(x: float | None, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def summarize(results: list[ArmResult], device: Device, dry_run: bool) -> dict[str, Any]:
    measured = {r.name: r for r in results if r.status == "measured" and r.tokens_per_s}
    ours = [r for r in measured.values() if r.stack == "ours"]
    best = max(ours, key=lambda r: r.tokens_per_s or 0.0) if ours else None
    a, a2, b0 = measured.get("A"), measured.get("A2"), measured.get("B0")

    def ratio(x: ArmResult | None, y: ArmResult | None) -> float | None:
        if x is None or y is None or not x.tokens_per_s or not y.tokens_per_s:
            return None
        return x.tokens_per_s / y.tokens_per_s

    b_over_a = ratio(best, a)
    ratios = {
        "best_ours": best.name if best else None,
        "B_over_A": b_over_a,
        "B_over_A2": ratio(best, a2),
        "B0_over_A": ratio(b0, a),
    }
    not_judged = "dry run on the CPU: not a measurement" if dry_run else None
    mfu = best.mfu_4n if best else None
    if not_judged is None and not device.h200_class:
        mfu_note: str | None = f"{device.name} is not H200 class (H100/H200): reported, not judged"
    elif not_judged is None and mfu is None:
        mfu_note = "no measured loraplane arm, or no peak for this device (--peak-tflops)"
    else:
        mfu_note = not_judged
    goals = [
        {
            "goal": f"MFU_4N >= {MFU_GOAL:.0%} on an H200-class GPU",
            "value": mfu,
            "arm": best.name if best else None,
            "met": None if mfu_note else (mfu is not None and mfu >= MFU_GOAL),
            "note": mfu_note,
        },
        {
            "goal": f"B/A >= {RATIO_GOAL} (fastest loraplane arm over plain HF + peft)",
            "value": b_over_a,
            "arm": best.name if best else None,
            "met": None if not_judged or b_over_a is None else b_over_a >= RATIO_GOAL,
            "note": not_judged if not_judged or b_over_a is not None else "A or every B arm not measured",
        },
    ]
    return {"ratios": ratios, "goals": goals}


def _device_line(dev: dict[str, Any]) -> str:
    line = f"- device: {dev['name']}"
    if dev["capability"]:
        line += f", {dev['total_memory_gib']:.0f} GiB, compute capability {dev['capability']}"
    line += f"; dense bf16 peak {_fmt(dev['peak_bf16_tflops'], '.0f', 'unknown')} TFLOP/s"
    return line + (f" ({dev['peak_source']})" if dev["peak_source"] else "")


def markdown(report: dict[str, Any]) -> str:
    dev, model, data, env = report["device"], report["model"], report["data"], report["environment"]
    v, shape = env["versions"], model["shape"]
    lines = [
        f"# GPU training benchmark (issue 25): {dev['name']}, {report['started_at']}",
        "",
        "**Dry run** (CPU, tiny demo model): checks that every code path works; the numbers mean nothing."
        if report["dry_run"]
        else "Numbers from one run of `bench/gpu_train.py`.",
        "",
        _device_line(dev),
        "- software: "
        + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "cuda", "transformers", "peft", "accelerate"))
        + ", "
        + ", ".join(f"{k} {v[k]}" for k in ("trl", "datasets", "flash_attn", "liger_kernel", "bitsandbytes")),
        f"- model: `{model['preset']}`, random-init Llama built locally, "
        f"{model['params'] / 1e6:,.1f}M parameters (N), {model['dtype']}; "
        f"LoRA r={LORA_R} alpha={LORA_ALPHA} on all linear layers; "
        f"{shape['num_hidden_layers']} layers x {shape['hidden_size']}, vocabulary {shape['vocab_size']:,}",
        f"- data: {data['examples']} synthetic chat-like examples, lengths log-normal mean "
        f"{data['mean_length']:.0f} (min {data['min_length']}, max {data['max_length']}, "
        f"cap {data['seq_len']}), {data['tokens']:,} tokens of which {data['loss_tokens']:,} with a label; "
        f"batch {data['batch_size']}, one epoch; the first {data['warmup_steps']} steps not measured, "
        f"an arm stops after {data['arm_seconds']:.0f} s; before the arms, a discarded warm-up "
        f"({report['warm_up'].get('steps')} steps of A: {report['warm_up'].get('status')})",
        "",
        "| arm | what | status | tok/s | loss tok/s | MFU_4N | peak GPU mem (GiB) | padding | steps | "
        "loss first → last | attention | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in report["arms"]:
        notes = r["reason"] or ""
        if r["problems"]:
            notes = "; ".join(["CHECK FAILED: " + p for p in r["problems"]] + ([notes] if notes else []))
        if r["notes"]:
            notes = "; ".join(([notes] if notes else []) + r["notes"])
        steps = "—" if r["steps"] is None else f"{r['measured_steps']}/{r['steps']}"
        loss = "—" if r["loss_first"] is None else f"{r['loss_first']:.3f} → {r['loss_last']:.3f}"
        mfu = "—" if r["mfu_4n"] is None else f"{100 * r['mfu_4n']:.1f}%"
        pad = "—" if r["padding_fraction"] is None else f"{100 * r['padding_fraction']:.1f}%"
        lines.append(
            f"| {r['name']} | {r['what']} | {r['status']} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['loss_tokens_per_s'], ',.0f')} | {mfu} | {_fmt(r['peak_gpu_mem_gib'], '.1f')} | "
            f"{pad} | {steps} | {loss} | {r['attention'] or '—'} | {notes.replace('|', '/')} |"
        )
    ratios = report["ratios"]
    lines += [
        "",
        "tok/s: non-padding tokens (prompt and answer: all go forward and backward) per second over the "
        "measured steps; loss tok/s: tokens with a label. MFU_4N = 4 N tok/s / peak. steps: measured/all.",
        "",
        "## Ratios and goals",
        "",
        f"- fastest loraplane arm: {ratios['best_ours'] or '—'}; B/A = {_fmt(ratios['B_over_A'], '.2f')}, "
        f"B/A2 = {_fmt(ratios['B_over_A2'], '.2f')}, B0/A (overhead) = {_fmt(ratios['B0_over_A'], '.2f')}",
    ]
    for goal in report["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        value = goal["value"]
        shown = "—" if value is None else (f"{100 * value:.1f}%" if "MFU" in goal["goal"] else f"{value:.2f}")
        lines.append(
            f"- {goal['goal']}: {shown} ({goal['arm'] or '—'}): **{verdict}**"
            + (f" ({goal['note']})" if goal["note"] else "")
        )
    lines += ["", f"Wall time {report['wall_s']:.0f} s. JSON beside this file: `{report['json']}`.", ""]
    return "\n".join(lines)


def write_reports(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (md_path, markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny demo model, few short steps.")
    parser.add_argument(
        "--check", action="store_true", help="Print which libraries import and the GPU; exit."
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="Report directory.")
    parser.add_argument("--workdir", type=Path, default=None, help="Model and scratch (reused across runs).")
    parser.add_argument(
        "--model", choices=sorted(PRESETS), default=None, help="Default llama-1b (dry: tiny)."
    )
    parser.add_argument("--arms", default=",".join(a.name for a in ARMS), help="Comma-separated arm names.")
    parser.add_argument("--examples", type=int, default=None, help="Training examples (1024; dry: 24).")
    parser.add_argument("--seq-len", type=int, default=None, help="Max length (2048; dry: 128).")
    parser.add_argument("--batch-size", type=int, default=None, help="Rows per step (8; dry: 4).")
    parser.add_argument("--warmup-steps", type=int, default=None, help="Steps not measured (3; dry: 1).")
    parser.add_argument("--arm-seconds", type=float, default=30.0, help="Stop an arm after this long.")
    parser.add_argument("--budget-s", type=float, default=360.0, help="Skip the arms left after this long.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of this device.")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.model = args.model or ("tiny" if dry else "llama-1b")
    args.examples = args.examples or (24 if dry else 1024)
    args.seq_len = args.seq_len or (128 if dry else 2048)
    args.batch_size = args.batch_size or (4 if dry else 8)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if dry else 3)
    unknown = set(args.arms.split(",")) - {a.name for a in ARMS}
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)}; known: {','.join(a.name for a in ARMS)}")
    return args


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the dry run is the CPU's
    began = time.monotonic()
    started_at = datetime.now(UTC)
    bootstrap = ensure_loraplane()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cuda = bool(torch.cuda.is_available())
    env = environment(cuda=cuda)
    env["loraplane"] = bootstrap
    device = detect_device(args.peak_tflops)
    if args.check:
        say(json.dumps({"device": asdict(device), "environment": env}, indent=2))
        return 0
    if not cuda and not args.dry_run:
        say("no CUDA GPU is visible: run on a GPU machine, or use --dry-run for the CPU smoke run")
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-train-{started_at:%Y%m%d-%H%M%S}-{device.slug}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    work = args.workdir or Path(tempfile.gettempdir()) / "loraplane-gpu-train"
    work.mkdir(parents=True, exist_ok=True)
    say(f"device: {device.name}; peak bf16 {_fmt(device.peak_bf16_tflops, '.0f', 'unknown')} TFLOP/s")
    say(f"loraplane: {bootstrap}; trainer importable: {env['loraplane_trainer']['importable']}")

    t = time.perf_counter()
    model_dir = build_model(work, args.model, args.seq_len)
    n_params, shape = count_params(model_dir)
    took = time.perf_counter() - t
    say(f"model {args.model}: {n_params / 1e6:,.1f}M parameters in {model_dir} ({took:.0f} s)")
    examples = make_data(args.examples, args.seq_len, int(shape["vocab_size"]))
    lengths = [len(e.input_ids) for e in examples]
    dtype_name: Literal["bfloat16", "float32"] = "bfloat16"
    ctx = Context(
        model_dir=model_dir,
        work=work,
        cuda=cuda,
        dtype_name=dtype_name,
        n_params=n_params,
        peak_tflops=device.peak_bf16_tflops,
        examples=examples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        arm_seconds=args.arm_seconds,
        env=env,
    )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "dry_run": args.dry_run,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": 0.0,
        "json": json_path.name,
        "device": asdict(device),
        "environment": env,
        "model": {"preset": args.model, "params": n_params, "shape": shape, "dtype": dtype_name},
        "data": {
            "examples": len(examples),
            "seq_len": args.seq_len,
            "mean_length": float(np.mean(lengths)),
            "min_length": min(lengths),
            "max_length": max(lengths),
            "tokens": sum(lengths),
            "loss_tokens": sum(1 for e in examples for x in e.labels if x != -100),
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup_steps,
            "arm_seconds": args.arm_seconds,
            "learning_rate": LEARNING_RATE,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        },
        "warm_up": {},
        "arms": [],
        "ratios": {},
        "goals": [],
    }
    selected = set(args.arms.split(","))
    with _quiet_libraries():
        report["warm_up"] = warm_up(ctx)
    say(f"warm-up (discarded): {report['warm_up']['steps']} steps of arm A, {report['warm_up']['status']}")
    results: list[ArmResult] = []
    header = f"{'arm':14} {'status':8} {'tok/s':>10} {'MFU_4N':>7} {'peak GiB':>8} {'loss':>17}  notes"
    say(header)
    for arm in ARMS:
        if arm.liger:  # the fastest measured loraplane arm, with Liger on top
            best = max(
                (
                    r
                    for r in results
                    if r.status == "measured" and r.stack == "ours" and r.quantization == "none"
                ),
                key=lambda r: r.tokens_per_s or 0.0,
                default=None,
            )
            if best is not None:
                base = next(a for a in ARMS if a.name == best.name)
                arm = replace(base, name=arm.name, what=f"{best.name} + Liger kernels", liger=True)
        reason = skip_reason(arm, ctx)
        if arm.name not in selected:
            reason = "not selected (--arms)"
        elif reason is None and time.monotonic() - began > args.budget_s:
            reason = f"time budget spent (--budget-s {args.budget_s:.0f})"
        if reason is not None:
            result = ArmResult(
                arm.name, arm.what, arm.stack, arm.batching, "skipped", reason=reason, attention=arm.attention
            )
        else:
            with _quiet_libraries():
                result = run_arm(arm, ctx)
        results.append(result)
        report["arms"] = [asdict(r) for r in results]
        report.update(summarize(results, device, args.dry_run))
        report["wall_s"] = time.monotonic() - began
        write_reports(report, json_path, md_path)
        mfu = "—" if result.mfu_4n is None else f"{100 * result.mfu_4n:.1f}%"
        loss = "—" if result.loss_first is None else f"{result.loss_first:.3f}->{result.loss_last:.3f}"
        notes = "; ".join(result.problems + ([result.reason] if result.reason else []) + result.notes)
        say(
            f"{result.name:14} {result.status:8} {_fmt(result.tokens_per_s, '10,.0f', '—'):>10} {mfu:>7} "
            f"{_fmt(result.peak_gpu_mem_gib, '8.1f', '—'):>8} {loss:>17}  {notes}"
        )
        if result.traceback:
            say(result.traceback)

    for goal in report["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        say(
            f"goal {goal['goal']}: {goal['value']} -> {verdict}"
            + (f" ({goal['note']})" if goal["note"] else "")
        )
    ratios = report["ratios"]
    say(f"B/A = {_fmt(ratios['B_over_A'], '.2f')} (fastest loraplane arm: {ratios['best_ours']})")
    say(f"report: {json_path} and {md_path.name} ({report['wall_s']:.0f} s)")
    bad = [r for r in results if r.status == "failed" or r.problems]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
