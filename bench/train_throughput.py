"""Training throughput: plain trl/peft SFT against loraplane's trainer, on variable-length chat data.

Numbers, not a test (target B1, stated below). Arms, each a LoRA (r=16, alpha=32, all
linear layers, no dropout) fine-tune of the same model on the same examples, one epoch, batch size 8,
learning rate 1e-3 (linear decay, no warm-up), max length 512:

* **A**: ``trl.SFTTrainer`` + ``peft.LoraConfig``, pad-to-longest random batches. SFTConfig defaults
  except what equal math needs: the learning rate, batch size, ``max_length``, seed, ``use_cpu``,
  ``bf16=False`` and ``gradient_checkpointing=False`` (trl defaults both to True; every arm trains in
  FP32 without recomputation), ``report_to="none"``, ``save_strategy="no"``, ``logging_steps=1``,
  ``dataloader_num_workers=0``, ``disable_tqdm``; its ``PrinterCallback`` is removed, as
  ``build_trainer`` removes it, so no arm prints a line per step.
* **A2**: A + ``train_sampling_strategy="group_by_length"`` (transformers' length-grouped sampler).
* **B0**: ``loraplane.trainer.sft.build_trainer`` with ``training.batching=padded``: every
  optimisation off (random batches padded to the longest, like A); B0/A is the overhead check.
* **B**: ``build_trainer`` as shipped (``training.batching=grouped``, the default).
* **B-packed** (only with ``--packed``): ``build_trainer`` with ``training.batching=packed`` (BFD
  packing into 512-token rows, padding-free, ``training.batch_size`` rows per step: ``--packed-rows``,
  default 8 like the other arms; on CPU, SDPA gets a block-diagonal mask over the whole flattened
  batch). 8 packed rows hold about 4x the tokens of 8 examples, so this arm takes about a quarter of
  the optimizer steps and its loss is not comparable; ``--packed-rows 2`` matches the steps.

Model: a random-init Llama built with ``build_demo_model`` (4 layers x 256 hidden, 4 heads of 64,
MLP 1024, the demo corpus's byte-level BPE vocabulary of 836; 4.6M parameters), FP32, SDPA.

Data: synthetic pre-tokenized examples with log-normal lengths (mean 120 tokens, sigma 0.5, clipped
to [24, 512]), seed 0; random batches of 8 padded to their longest are about 45% padding. The first
20-60% of each example is the prompt (labels -100, random tokens); the rest is the answer, drawn
from a fixed random bigram table over 64 token ids and ended by EOS, so the adapter has something
to learn and the held-out loss moves. Every arm trains on the same examples, one pass (equal token
budget). Default 320 examples = 40 steps of 8.

Protocol: each run of an arm is its own child process (``--child``) with ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``torch.set_num_threads`` set to ``--threads`` (default: all cores) for every
arm. Arms alternate A, A2, B0, B, (B-packed,) A, A2, ... for ``--rounds`` rounds (default 6). In the
child:

1. Warm-up (not measured): a throwaway trainer of the same arm trains one step on 8 other examples
   (lengths 24 to 512), so one-time costs (oneDNN primitives, allocator pools, lazy imports) are paid
   before the clock starts.
2. A fresh model and trainer of the arm are built (reported as "setup": model load, LoRA wrap and
   dataset preparation, packing included).
3. The clock runs around ``trainer.train()``: the whole epoch, sampler, collation and optimizer
   included. A wrapping data collator counts, per batch, the trained tokens (labels != -100 after
   collation), the real tokens and the padded grid (rows x longest row). **tokens/s = trained tokens /
   train() wall time** (the same tokens in every arm). "steady" tok/s is the trained tokens of steps
   4..n over the time from the end of step 3 to the end of the last step.
4. Checks: the minimum ``grad_norm`` over all steps (must be > 0), the LoRA B matrices are non-zero
   after training, every arm trained the same number of tokens, and the loss on 32 held-out examples
   (token-mean cross-entropy over the answer tokens, padded batches of 8, ``model.eval()``) before
   and after training. Losses agree when an arm's median held-out loss is within 5% of A's. Arms that
   batch differently follow different SGD paths: A alone, trained with data-order seeds 0-4, ends
   between 5.82 and 6.11 (a 5% spread), while training moves the held-out loss from 8.02 to about 6
   (25%). B0 and A, the same math on the same batches, give identical losses.
5. Peak RSS is ``ru_maxrss`` of the child (warm-up run and model loading included).

Other processes: a shared machine ruins CPU timings (two busy processes on two cores slow a
2-thread run down 10x or more). Before each run the benchmark waits (up to ``--quiet-wait`` s) for
the machine to be idle; the child compares the machine's busy CPU time with its own and, when other
processes took more than 10% of the cores during train(), stops and is run again (up to
``--retries`` times; the last attempt is kept and counted in a warning). Disturbance inside the
hypervisor does not show there: the interleaving and the medians have to absorb it.

Ratios B0/A, B/A, B/A2, B-packed/A and B-packed/B are paired per round (same round, runs seconds
apart); the printed figure is the median over rounds with a seeded bootstrap 95% interval of that
median (10,000 resamples of the rounds). Targets (B1): B0/A >= 0.97 with
the interval's lower bound >= 0.90; B/A >= 1.5; B/A2 >= 1.0.

Dataset size matters for A2: transformers sorts within mega-batches of min(50, N/32) batches, so on
a few hundred examples A2 leaves more padding than it would on thousands. The report gives both
samplers' padding here and, computed without training, on 5,000 examples of the same distribution.

    .venv/bin/python bench/train_throughput.py [--rounds 5] [--quick] [--threads N] [--examples N]
        [--arms A,A2,B0,B] [--packed [--packed-rows 8]]

Default settings take about 13 minutes on an idle 2-core machine (``--packed``: about 4 more);
``--quick`` (2 rounds, 160 examples) about 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]

ARMS = ("A", "A2", "B0", "B", "B-packed")  # the order of every round
DEFAULT_ARMS = ("A", "A2", "B0", "B")
BATCHING = {"B0": "padded", "B": "grouped", "B-packed": "packed"}
SEED = 0
BATCH_SIZE = 8
MAX_LENGTH = 512
LEARNING_RATE = 1e-3
LORA_R = 16
LORA_ALPHA = 32
MEAN_LENGTH = 120
SIGMA = 0.5
MIN_LENGTH = 24
HELDOUT = 32
WARMUP_EXAMPLES = 8
ANSWER_VOCAB = 64  # answers use 64 token ids, each followed by one of two successors
STEADY_SKIP = 3  # steps left out of the "steady" rate
LOSS_TOLERANCE = 0.05  # relative, held-out loss of each arm against A's (A's own spread over seeds: 5%)
QUIET_SHARE = 0.10  # before a run: wait until the machine's CPU use is below this share
CONTENDED_SHARE = 0.10  # a run during which other processes used more than this share of all cores
CONTENDED_EXIT = 75  # the child's exit status for "disturbed, measure again" (EX_TEMPFAIL)
SCALE_EXAMPLES = 5000  # for the computed sampler-padding comparison at a realistic dataset size

MODEL = {
    "vocab_size": 2048,  # the demo corpus yields fewer merges: the real vocabulary is len(tokenizer)
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": MAX_LENGTH,
}


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def draw_lengths(n: int, rng: np.random.Generator) -> list[int]:
    mu = np.log(MEAN_LENGTH) - SIGMA**2 / 2  # the log-normal's mean is then MEAN_LENGTH
    return [int(x) for x in np.clip(np.round(rng.lognormal(mu, SIGMA, size=n)), MIN_LENGTH, MAX_LENGTH)]


def make_examples(n: int, vocab: int, seed: int, *, lengths: list[int] | None = None) -> list[Example]:
    """Log-normal lengths; prompt tokens random (not trained), answer tokens from a fixed bigram table."""
    task = np.random.default_rng(12345)  # the "task": the same for training and held-out data
    first = 5  # ids 0-4 are the demo tokenizer's special tokens; 1 is EOS
    answer_vocab = task.choice(np.arange(first, vocab), size=ANSWER_VOCAB, replace=False)
    successors = answer_vocab[task.integers(0, ANSWER_VOCAB, size=(vocab, 2))]
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = draw_lengths(n, rng)
    examples = []
    for length in lengths:
        prompt = int(length * rng.uniform(0.2, 0.6))
        ids = [int(x) for x in rng.integers(first, vocab, size=prompt)]
        for _ in range(length - prompt - 1):
            ids.append(int(successors[ids[-1], rng.integers(2)]))
        ids.append(1)
        examples.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return examples


# --------------------------------------------------------------------------------------------- child


@dataclass
class RunResult:
    arm: str
    steps: int
    trained_tokens: int
    real_tokens: int
    grid_tokens: int
    train_s: float
    setup_s: float
    tokens_per_s: float
    steady_tokens_per_s: float
    peak_rss_mib: float
    train_loss: float
    last_loss: float
    heldout_before: float
    heldout_after: float
    min_grad_norm: float
    lora_b_abs_sum: float
    threads: int
    warmup_s: float
    cpu_s: float  # user + system CPU time of the child during train()
    foreign_cpu_share: float  # CPU time of everything else during train(), as a share of all cores
    load_before: float  # 1-minute load average of the machine when train() started
    step_s: list[float]  # wall time of every optimizer step (end to end)


class CountingCollator:
    """Wraps the trainer's collator; records (trained, real, padded-grid) tokens of every batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        ids, labels = batch["input_ids"], batch["labels"]
        trained = int((labels != -100).sum())
        # Padding-free batches are one row without padding and without an attention mask.
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(ids.numel())
        self.batches.append((trained, real, int(ids.numel())))
        return batch


def _plain_trainer(arm: str, model_dir: Path, examples: list[Example], out: Path) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    extra = {"train_sampling_strategy": "group_by_length"} if arm == "A2" else {}
    args = SFTConfig(
        output_dir=str(out),
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=BATCH_SIZE,
        num_train_epochs=1,
        max_length=MAX_LENGTH,
        seed=SEED,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    dataset = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    trainer.remove_callback(PrinterCallback)  # as build_trainer does: no per-step print to stdout
    return trainer


def _our_trainer(arm: str, model_dir: Path, examples: list[Example], out: Path, packed_rows: int) -> Any:
    from transformers import AutoTokenizer, set_seed

    from loraplane.trainer.config import load_config
    from loraplane.trainer.data import TokenizedExample
    from loraplane.trainer.sft import build_trainer

    config = load_config(
        None,
        [
            f"base_model.path={model_dir}",
            "base_model.dtype=float32",
            f"dataset.path={out / 'unused.jsonl'}",
            f"output.adapters_root={out / 'adapters'}",
            "output.name=bench",
            f"lora.r={LORA_R}",
            f"lora.alpha={LORA_ALPHA}",
            "lora.dropout=0.0",
            "lora.target_modules=all-linear",
            f"training.learning_rate={LEARNING_RATE}",
            f"training.batch_size={packed_rows if arm == 'B-packed' else BATCH_SIZE}",
            f"training.max_seq_length={MAX_LENGTH}",
            "training.epochs=1",
            f"training.seed={SEED}",
            "training.logging_steps=1",
            f"training.batching={BATCHING[arm]}",
            "tracking.tensorboard=false",  # as the reference arm's report_to="none"
        ],
    )
    train = [
        TokenizedExample(row=i + 1, input_ids=e.input_ids, labels=e.labels) for i, e in enumerate(examples)
    ]
    set_seed(SEED)
    return build_trainer(config, AutoTokenizer.from_pretrained(model_dir), train, None, out)


def _trainer(arm: str, model_dir: Path, examples: list[Example], out: Path, packed_rows: int) -> Any:
    if arm in ("A", "A2"):
        return _plain_trainer(arm, model_dir, examples, out)
    return _our_trainer(arm, model_dir, examples, out, packed_rows)


def heldout_loss(model: Any, examples: list[Example], pad_id: int) -> float:
    """Token-mean cross-entropy over the trained (answer) tokens, padded batches of BATCH_SIZE."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), BATCH_SIZE):
            chunk = examples[start : start + BATCH_SIZE]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, e in enumerate(chunk):
                n = len(e.input_ids)
                ids[row, :n] = torch.tensor(e.input_ids)
                labels[row, :n] = torch.tensor(e.labels)
                mask[row, :n] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += float(
                F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
            )
            count += int((target != -100).sum())
    model.train(was_training)
    return total / count


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (steal included: the hypervisor's other guests)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


class ContendedError(Exception):
    """Other processes took a share of the CPU during the measured run: its timing says nothing."""


def child(arm: str, work: Path, threads: int, out_json: Path, *, keep_contended: bool = False) -> int:
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    data = json.loads((work / "data.json").read_text())
    train = [Example(**e) for e in data["train"]]
    warmup = [Example(**e) for e in data["warmup"]]
    heldout = [Example(**e) for e in data["heldout"]]
    packed_rows = int(data["packed_rows"])
    model_dir = work / "model"
    scratch = Path(tempfile.mkdtemp(prefix=f"run-{arm}-", dir=work))

    # 1. warm-up: the same kind of trainer on other examples, thrown away
    started = time.perf_counter()
    _trainer(arm, model_dir, warmup, scratch / "warmup", packed_rows).train()
    warmup_s = time.perf_counter() - started

    # 2. the measured trainer
    started = time.perf_counter()
    trainer = _trainer(arm, model_dir, train, scratch / "run", packed_rows)
    setup_s = time.perf_counter() - started
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    step_ends: list[float] = []
    origin: list[float] = []  # wall clock, own CPU and machine CPU seconds at the start of train()

    def foreign_share() -> float:
        wall = time.perf_counter() - origin[0]
        own = _cpu_seconds() - origin[1]
        return max(0.0, _machine_busy_seconds() - origin[2] - own) / (wall * (os.cpu_count() or 1))

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            step_ends.append(now)
            # Stop early when another process takes the CPU: the run is measured again.
            if not keep_contended and now - origin[0] > 2 and foreign_share() > CONTENDED_SHARE:
                raise ContendedError

    trainer.add_callback(Clock())
    pad_id = int(trainer.processing_class.pad_token_id)
    before = heldout_loss(trainer.model, heldout, pad_id)

    # 3. the clock runs around train()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    origin.extend([started, _cpu_seconds(), _machine_busy_seconds()])
    try:
        output = trainer.train()
    except ContendedError:
        return CONTENDED_EXIT
    train_s = time.perf_counter() - started
    cpu_s = _cpu_seconds() - origin[1]
    foreign = foreign_share()
    if foreign > CONTENDED_SHARE and not keep_contended:
        return CONTENDED_EXIT

    # 4. checks
    after = heldout_loss(trainer.model, heldout, pad_id)
    history = trainer.state.log_history
    grad_norms = [float(h["grad_norm"]) for h in history if "grad_norm" in h]
    losses = [float(h["loss"]) for h in history if "loss" in h]
    lora_b = sum(float(p.detach().abs().sum()) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    steps = len(step_ends)
    if len(counter.batches) != steps:
        raise RuntimeError(f"{len(counter.batches)} batches collated for {steps} optimizer steps")
    trained = sum(b[0] for b in counter.batches)
    steady_tokens = sum(b[0] for b in counter.batches[STEADY_SKIP:])
    steady_s = step_ends[-1] - step_ends[STEADY_SKIP - 1] if steps > STEADY_SKIP else float("nan")
    result = RunResult(
        arm=arm,
        steps=steps,
        trained_tokens=trained,
        real_tokens=sum(b[1] for b in counter.batches),
        grid_tokens=sum(b[2] for b in counter.batches),
        train_s=train_s,
        setup_s=setup_s,
        tokens_per_s=trained / train_s,
        steady_tokens_per_s=steady_tokens / steady_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        train_loss=float(output.training_loss),
        last_loss=losses[-1] if losses else float("nan"),
        heldout_before=before,
        heldout_after=after,
        min_grad_norm=min(grad_norms) if grad_norms else float("nan"),
        lora_b_abs_sum=lora_b,
        threads=torch.get_num_threads(),
        warmup_s=warmup_s,
        cpu_s=cpu_s,
        foreign_cpu_share=foreign,
        load_before=load_before,
        step_s=[b - a for a, b in zip([started, *step_ends], step_ends, strict=False)],
    )
    out_json.write_text(json.dumps(asdict(result)))
    return 0


# -------------------------------------------------------------------------------------------- parent


def environment(threads: int) -> list[str]:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return [
        f"cpu: {cpu}, {os.cpu_count()} logical cores, flags {' '.join(simd) or '?'}",
        f"threads per run: {threads} (OMP_NUM_THREADS, MKL_NUM_THREADS, torch.set_num_threads)",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
        f"datasets {datasets.__version__}",
    ]


def bootstrap_median(ratios: list[float], draws: int = 10_000) -> tuple[float, float, float]:
    values = np.array(ratios)
    rng = np.random.default_rng(SEED)
    medians = np.median(values[rng.integers(0, len(values), size=(draws, len(values)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(values)), float(low), float(high)


def wait_quiet(limit_s: float) -> float:
    """Wait up to ``limit_s`` until the machine is (nearly) idle; return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if psutil.cpu_percent(interval=1.0) / 100 < QUIET_SHARE:
            break
    return time.perf_counter() - started


def run_child(arm: str, work: Path, threads: int, tag: str, *, keep_contended: bool) -> RunResult | None:
    """Run one measurement in a child process; None when other processes took the CPU during it."""
    out_json = work / f"{tag}.json"
    log = work / f"{tag}.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--work", str(work)]
    cmd += ["--threads", str(threads), "--out", str(out_json)] + (
        ["--keep-contended"] if keep_contended else []
    )
    with log.open("w") as sink:
        proc = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == CONTENDED_EXIT:
        return None
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"arm {arm} ({tag}) failed with exit {proc.returncode}:\n{tail}")
    return RunResult(**json.loads(out_json.read_text()))


def sampler_padding(n: int) -> tuple[int, float, float]:
    """transformers' mega-batch size, and the padding A2's and B's samplers leave on ``n`` such examples."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from loraplane.trainer.batching import GroupedByLengthSampler, padding_fraction

    lengths = draw_lengths(n, np.random.default_rng(SEED))
    order = get_length_grouped_indices(lengths, BATCH_SIZE, generator=torch.Generator().manual_seed(SEED))
    hf = [order[i : i + BATCH_SIZE] for i in range(0, n, BATCH_SIZE)]
    ours = GroupedByLengthSampler(lengths, BATCH_SIZE, SEED).batches()
    mult = max(1, min(n // (BATCH_SIZE * 4), 50))
    return mult, padding_fraction(lengths, hf), padding_fraction(lengths, ours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None, help="Clean rounds of every arm (default 5).")
    parser.add_argument("--quick", action="store_true", help="Smoke check: 2 rounds, 160 examples.")
    parser.add_argument("--examples", type=int, default=None, help="Training examples (default 320).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help=f"Comma-separated, of {','.join(ARMS)}."
    )
    parser.add_argument("--packed", action="store_true", help="Add the B-packed arm.")
    parser.add_argument(
        "--packed-rows",
        type=int,
        default=BATCH_SIZE,
        help="training.batch_size of B-packed (512-token rows).",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="Seconds to wait for an idle machine before each run."
    )
    parser.add_argument(
        "--retries", type=int, default=8, help="Times a run disturbed by other processes is measured again."
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keep-contended", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.work, args.threads, args.out, keep_contended=args.keep_contended)

    rounds = args.rounds or (2 if args.quick else 6)
    n_examples = args.examples or (160 if args.quick else 320)
    arms = [a for a in ARMS if a in args.arms.split(",") or (args.packed and a == "B-packed")]
    if not arms:
        parser.error(f"--arms: none of {args.arms!r} is one of {','.join(ARMS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loraplane-trainbench-"))
    work.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()

    for line in environment(args.threads):
        say(line)
    from transformers import AutoTokenizer

    from loraplane.trainer.demo_model import DemoModelSpec, build_demo_model

    model_dir = work / "model"
    if not model_dir.exists():
        build_demo_model(model_dir, DemoModelSpec(**MODEL))
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    train = make_examples(n_examples, vocab, SEED)
    warmup_lengths = [int(x) for x in np.linspace(MIN_LENGTH, MAX_LENGTH, WARMUP_EXAMPLES)]
    data = {
        "train": [asdict(e) for e in train],
        "warmup": [asdict(e) for e in make_examples(0, vocab, SEED + 1, lengths=warmup_lengths)],
        "heldout": [asdict(e) for e in make_examples(HELDOUT, vocab, SEED + 2)],
        "packed_rows": args.packed_rows,
    }
    (work / "data.json").write_text(json.dumps(data))
    lengths = [len(e.input_ids) for e in train]
    say(
        f"model: random-init Llama {MODEL['num_hidden_layers']}L x {MODEL['hidden_size']}d, "
        f"MLP {MODEL['intermediate_size']}, vocab {vocab}, {_count_params(model_dir) / 1e6:.1f}M params, "
        f"FP32, SDPA; LoRA r={LORA_R} alpha={LORA_ALPHA} all-linear; lr {LEARNING_RATE}, batch {BATCH_SIZE} "
        f"(B-packed: {args.packed_rows} rows of {MAX_LENGTH}), 1 epoch"
    )
    say(
        f"data: {len(train)} examples, lengths log-normal mean {statistics.mean(lengths):.0f} "
        f"(median {statistics.median(lengths):.0f}, min {min(lengths)}, max {max(lengths)}), "
        f"{sum(lengths)} tokens, {sum(1 for e in train for x in e.labels if x != -100)} trained"
    )
    say(f"rounds: {rounds}, order {' '.join(arms)}; workdir {work}")
    say()

    results: dict[str, list[RunResult]] = {arm: [] for arm in arms}
    remeasured, kept_contended = 0, 0
    for rnd in range(1, rounds + 1):
        for arm in arms:
            for attempt in range(args.retries + 1):
                waited = wait_quiet(args.quiet_wait)
                last = attempt == args.retries
                r = run_child(arm, work, args.threads, f"r{rnd}-{arm}", keep_contended=last)
                if r is not None:
                    break
                remeasured += 1
                say(f"round {rnd} {arm:8}: other processes took the CPU during the run; measuring it again")
            assert r is not None
            kept_contended += r.foreign_cpu_share > CONTENDED_SHARE
            results[arm].append(r)
            say(
                f"round {rnd} {arm:8}: {r.tokens_per_s:7.1f} tok/s (steady {r.steady_tokens_per_s:7.1f})"
                f"  {r.steps:3d} steps {r.train_s:5.1f} s  {r.cpu_s / r.train_s:4.2f} cores"
                f"  others {r.foreign_cpu_share:4.0%}"
                + (f" (waited {waited:.0f} s)" if waited > 5 else "")
                + f"  RSS {r.peak_rss_mib:5.0f} MiB  loss {r.train_loss:.3f}  held-out {r.heldout_after:.3f}"
            )
    if kept_contended:
        say(f"WARNING: {kept_contended} runs were disturbed by other processes after {args.retries} retries")
    report(results, n_examples, remeasured)
    say(f"\ntotal wall time {time.perf_counter() - begun:.0f} s")
    return 0


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def report(results: dict[str, list[RunResult]], n_examples: int, remeasured: int) -> None:
    med = statistics.median
    rounds = len(next(iter(results.values())))
    say()
    header = (
        f"{'arm':8} {'tok/s':>7} {'min-max':>13} {'steady':>7} {'steps':>5} {'pad %':>5} "
        f"{'RSS MiB':>7} {'setup s':>7} {'train loss':>10} {'last loss':>9} {'held-out':>8}"
    )
    say(
        f"medians over {rounds} rounds ({remeasured} runs disturbed by other processes were measured again); "
        "tok/s = trained (label != -100) tokens per second of train()"
    )
    say(header)
    say("-" * len(header))
    for arm, runs in results.items():
        tps = [r.tokens_per_s for r in runs]
        pad = 100 * (1 - runs[0].real_tokens / runs[0].grid_tokens)
        say(
            f"{arm:8} {med(tps):7.1f} {min(tps):6.1f}-{max(tps):<6.1f} "
            f"{med(r.steady_tokens_per_s for r in runs):7.1f} {runs[0].steps:5d} {pad:5.1f} "
            f"{med(r.peak_rss_mib for r in runs):7.0f} {med(r.setup_s for r in runs):7.1f} "
            f"{med(r.train_loss for r in runs):10.4f} {med(r.last_loss for r in runs):9.4f} "
            f"{med(r.heldout_after for r in runs):8.4f}"
        )
    if "A" in results:
        a0 = results["A"][0]
        say(
            "\npadding fraction of A (share of the padded grid that is padding): "
            f"{1 - a0.real_tokens / a0.grid_tokens:.1%}"
        )
    mult, a2_here, b_here = sampler_padding(n_examples)
    big_mult, a2_big, b_big = sampler_padding(SCALE_EXAMPLES)
    say(
        f"A2's sampler (transformers) sorts within mega-batches of {mult} batches at {n_examples} examples "
        f"({big_mult} from {BATCH_SIZE * 4 * 50} up). Sampler padding of A2 / B on this length distribution: "
        f"{a2_here:.1%} / {b_here:.1%} here, {a2_big:.1%} / {b_big:.1%} with {SCALE_EXAMPLES} examples "
        "(computed, not trained)."
    )

    say("\nratios of tokens/s, paired per round: median [bootstrap 95% CI]")
    pairs = [("B0", "A"), ("B", "A"), ("B", "A2"), ("B-packed", "A"), ("B-packed", "B")]
    targets = {("B0", "A"): 0.97, ("B", "A"): 1.5, ("B", "A2"): 1.0}
    verdicts: list[str] = []
    for num, den in pairs:
        if num not in results or den not in results:
            continue
        ratios = [n.tokens_per_s / d.tokens_per_s for n, d in zip(results[num], results[den], strict=True)]
        steady = [
            n.steady_tokens_per_s / d.steady_tokens_per_s
            for n, d in zip(results[num], results[den], strict=True)
        ]
        mid, low, high = bootstrap_median(ratios)
        line = f"  {num + '/' + den:11} {mid:5.2f} [{low:.2f}, {high:.2f}]  (steady-state {med(steady):.2f})"
        target = targets.get((num, den))
        if target is not None:
            ok = mid >= target and (num != "B0" or low >= 0.90)
            need = f">= {target}" + (", CI low >= 0.90" if num == "B0" else "")
            verdict = "PASS" if ok else "MISS"
            clears = (
                "the whole CI clears it" if low >= target else "the CI straddles it" if high >= target else ""
            )
            line += f"  target {need}: {verdict}" + (f" ({clears})" if clears else "")
            verdicts.append(f"{num}/{den} {verdict}")
        say(line)

    say("\nchecks")
    all_runs = [r for runs in results.values() for r in runs]
    tokens = sorted({r.trained_tokens for r in all_runs})
    say(f"  equal token budget: trained tokens per run {tokens} -> {'ok' if len(tokens) == 1 else 'DIFFER'}")
    min_grad = min(r.min_grad_norm for r in all_runs)
    min_b = min(r.lora_b_abs_sum for r in all_runs)
    say(
        f"  gradients: min grad_norm over all steps of all runs {min_grad:.4f} "
        f"-> {'ok' if min_grad > 0 else 'ZERO'}"
    )
    say(f"  LoRA B non-zero after training: min sum|B| {min_b:.3f} -> {'ok' if min_b > 0 else 'ZERO'}")
    ref_arm = "A" if "A" in results else next(iter(results))
    ref_runs = results[ref_arm]
    before = med(r.heldout_before for r in all_runs)
    ref = med(r.heldout_after for r in ref_runs)
    say(
        f"  held-out loss: {before:.4f} before training, {ref_arm} {ref:.4f} after "
        f"(agree: within {LOSS_TOLERANCE:.0%} of {ref_arm})"
    )
    for arm, runs in results.items():
        value = med(r.heldout_after for r in runs)
        delta = (value - ref) / ref
        verdict = "agree" if abs(delta) <= LOSS_TOLERANCE else "DISAGREE"
        if runs[0].steps != ref_runs[0].steps:
            verdict += (
                f" ({runs[0].steps} optimizer steps against {ref_runs[0].steps}: not the same optimisation)"
            )
        say(f"    {arm:8} {value:.4f} ({delta:+.2%}) -> {verdict}")
    if verdicts:
        say(f"\nverdict ({rounds} rounds): " + ", ".join(verdicts))


if __name__ == "__main__":
    raise SystemExit(main())
