"""Length-grouped batches: examples of similar length share a batch, so little compute goes to padding.

``transformers``' own ``group_by_length`` sorts within "mega-batches" of 50 batches; on chat data with a
wide length spread that still leaves about a tenth of every batch as padding. Here the whole epoch is
sorted by length (with a seeded random tie-break), cut into batches, and the batch order is shuffled:
padding drops to a few percent while every batch still comes from a random place in the length range.
Lengths are bucketed (``BUCKET_TOKENS`` wide) before sorting and shuffled within a bucket: in real data
length correlates with content (short answers, one class's words), and a strict sort would fill whole
batches with one kind of example. The order depends only on (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted one would have, and ``skip_first_batches`` lands on the right one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

BUCKET_TOKENS = 8  # examples within 8 tokens of each other are interchangeable: order is random among them


class GroupedByLengthSampler(Sampler[int]):  # type: ignore[misc]
    """Yield dataset indices so that each consecutive run of ``batch_size`` has similar lengths.

    ``batch_size`` is the per-device batch size: the DataLoader cuts the index stream into batches of
    that size (and under DDP accelerate deals them round-robin to the ranks), so every batch any rank
    sees is length-homogeneous. The one short batch (if any) comes last, keeping the others aligned.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        tie_break = torch.randperm(len(self.lengths), generator=g).tolist()
        lengths = self.lengths
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i] // BUCKET_TOKENS, tie_break[i]))
        full = len(order) // self.batch_size * self.batch_size
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if full < len(order):
            shuffled.append(order[full:])
        return shuffled

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded token grid that is padding when each batch is padded to its longest row."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1 - real / padded
