"""A deterministic tiny Llama-architecture base model that needs no download.

``loraplane demo build-model DIR`` and the test suite both use :func:`build_demo_model`. It trains a
byte-level BPE tokenizer on the corpus shipped with the package, gives it a chat template (with
``{% generation %}`` markers, so trainers can mask everything but the assistant's tokens), and writes
a randomly initialised ``LlamaForCausalLM`` in safetensors. Head size 64 is one vLLM's CPU attention
backend supports. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from loraplane.common.files import staged_directory

CORPUS_RESOURCE = "corpus.txt"

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is "<|role|>\n{content}<|end|>\n". The assistant's content and its end marker sit in
# a generation block: that is what "train on assistant tokens only" trains on, and "<|end|>" is the
# EOS token, so a fine-tuned model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 512
    # Larger than Llama's 0.02: with a hidden size of 128, 0.02 caps the logits at about +-3, so even a
    # perfectly trained adapter could not make a confident prediction on the demo model.
    initializer_range: float = 0.1
    seed: int = 0
    # For benchmark-sized models (bench/gpu_train.py); the defaults build the demo model as always.
    num_key_value_heads: int | None = None  # grouped-query attention; None: one KV head per head
    padded_vocab_size: int | None = None  # embedding rows beyond the tokenizer's (real models pad too)
    tie_word_embeddings: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the weights written


# Written into loraplane-demo.json only when changed, so the demo model's files stay as they were.
_BENCH_FIELDS: dict[str, object] = {
    "num_key_value_heads": None,
    "padded_vocab_size": None,
    "tie_word_embeddings": False,
    "dtype": "float32",
}


def _corpus_text() -> str:
    return (resources.files("loraplane.trainer") / "data" / CORPUS_RESOURCE).read_text(encoding="utf-8")


def _train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that merges are learnt from counts well above 1.
    tok.train_from_iterator([_corpus_text()] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _recorded(spec: DemoModelSpec) -> dict[str, object]:
    return {k: v for k, v in spec.__dict__.items() if k not in _BENCH_FIELDS or v != _BENCH_FIELDS[k]}


def build_demo_model(out_dir: Path, spec: DemoModelSpec | None = None) -> Path:
    """Write the demo base model into ``out_dir`` (which must not exist) and return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    spec = spec or DemoModelSpec()
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        tokenizer = _train_tokenizer(spec.vocab_size)
        tokenizer.save_pretrained(staging)
        end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        pad_id = tokenizer.convert_tokens_to_ids("<|pad|>")
        vocab_size = len(tokenizer)
        if spec.padded_vocab_size is not None:
            if spec.padded_vocab_size < vocab_size:
                raise ValueError(f"padded_vocab_size {spec.padded_vocab_size} < the tokenizer's {vocab_size}")
            vocab_size = spec.padded_vocab_size
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads or spec.num_attention_heads,
            head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=None,
            eos_token_id=end_id,
            pad_token_id=pad_id,
            tie_word_embeddings=spec.tie_word_embeddings,
            initializer_range=spec.initializer_range,
            dtype=spec.dtype,
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
        model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=pad_id)
        model.save_pretrained(staging, safe_serialization=True)
        (staging / "loraplane-demo.json").write_text(
            json.dumps({"builder": "loraplane.trainer.demo_model", "spec": _recorded(spec)}, indent=2) + "\n"
        )
    return out_dir
