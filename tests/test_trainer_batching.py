"""Batching: length-grouped batches waste little on padding; packed rows never mix examples."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraplane.trainer.batching import GroupedByLengthSampler, padding_fraction
from loraplane.trainer.config import load_config


def _lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(512, max(8, int(rng.lognormvariate(4.6, 0.6)))) for _ in range(n)]


def test_grouped_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch() -> None:
    lengths = _lognormal_lengths(203)
    sampler = GroupedByLengthSampler(lengths, batch_size=8, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(203))
    assert list(GroupedByLengthSampler(lengths, batch_size=8, seed=5)) == first, "resume sees the same order"
    sampler.set_epoch(1)
    assert list(sampler) != first, "each epoch is shuffled anew"
    batches = sampler.batches()
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8, "short batch last"


def test_grouped_batches_pad_far_less_than_random_ones() -> None:
    lengths = _lognormal_lengths(400)
    order = list(range(400))
    random.Random(1).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 400, 8)]
    grouped = GroupedByLengthSampler(lengths, batch_size=8, seed=0).batches()
    random_pad, grouped_pad = padding_fraction(lengths, random_batches), padding_fraction(lengths, grouped)
    assert random_pad > 0.3, "the data spreads like real chat data"
    assert grouped_pad < 0.08
    assert grouped_pad < random_pad / 4


def test_examples_of_nearly_equal_length_are_mixed_not_sorted_into_one_kind_per_batch() -> None:
    # Two classes whose texts differ by one token: a strict length sort would give one class per batch.
    lengths = [20 if i % 2 else 21 for i in range(64)]
    batches = GroupedByLengthSampler(lengths, batch_size=8, seed=0).batches()
    mixed = [b for b in batches if {lengths[i] for i in b} == {20, 21}]
    assert len(mixed) >= len(batches) // 2


def test_a_packed_batch_gives_the_loss_and_gradients_of_its_examples_run_one_by_one(
    demo_model: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoTokenizer

    from loraplane.trainer.data import TokenizedExample
    from loraplane.trainer.sft import build_trainer

    config = load_config(
        None,
        [
            f"base_model.path={demo_model}",
            f"dataset.path={tmp_path / 'unused.jsonl'}",
            f"output.adapters_root={tmp_path / 'adapters'}",
            "output.name=bot",
            "training.batching=packed",
            "training.max_seq_length=64",
            "training.batch_size=1",
            "lora.target_modules=all-linear",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for row, (length, prompt) in enumerate([(9, 3), (17, 6), (23, 10), (12, 4)], start=1):
        ids = torch.randint(10, 500, (length,), generator=gen).tolist()
        examples.append(TokenizedExample(row=row, input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    trainer = build_trainer(config, tokenizer, examples, None, tmp_path / "run")
    # LoRA's B starts at zero, which would leave A without gradient: give the adapter non-zero weights.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=gen)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1, "padding-free: one row"
    assert int((batch["position_ids"][0] == 0).sum()) == 4, "all four examples packed into that row"
    assert "attention_mask" not in batch
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    packed_loss = trainer.compute_loss(model, batch)
    packed_loss.backward()
    packed_grads = [p.grad.detach().clone() for p in params]

    model.zero_grad()
    total, count = torch.zeros(()), 0
    for ex in examples:
        labels = torch.tensor([ex.labels])
        n = int((labels[0, 1:] != -100).sum())  # tokens predicted (labels shift by one)
        out = model(input_ids=torch.tensor([ex.input_ids]), labels=labels)
        total = total + out.loss * n
        count += n
    one_by_one = total / count
    one_by_one.backward()

    assert packed_loss.item() == pytest.approx(one_by_one.item(), abs=1e-5)
    assert any(float(g.abs().max()) > 0 for g in packed_grads)
    for packed, single in zip(packed_grads, (p.grad for p in params), strict=True):
        assert single is not None
        torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-4)
