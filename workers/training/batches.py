"""Deterministic data order, split into per-rank micro-batches, and padding.

A step consumes one *global* batch of ``micro_batch × world × accum`` examples taken from a
seeded permutation of the dataset (a fresh one per epoch). Every rank computes the same global
batch and takes its own micro-batches from it, so the data a step sees does not depend on how
many workers share it — which is what makes N workers reproduce one process exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.datasets import IGNORE_INDEX, Example
from workers.errors import DatasetError


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder of an epoch is dropped)."""
    if global_batch > n_examples:
        raise DatasetError(
            f"global batch ({global_batch}) is larger than the dataset ({n_examples} rows); "
            "lower batch size, workers or accumulation"
        )
    return n_examples // global_batch


def global_batch_indices(step: int, *, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step`` (0-based)."""
    per_epoch = steps_per_epoch(n_examples, global_batch)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=g)
    return perm[pos * global_batch : (pos + 1) * global_batch].tolist()


def derived_seed(*parts: int) -> int:
    """A seed that is a pure function of its parts (job seed, step, rank, micro-batch, …):
    what a resumed run draws is what the uninterrupted one drew."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % (1 << 62)
    return h


def rank_micro_batches(
    indices: Sequence[int], *, world: int, rank: int, accum: int
) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch (interleaved over ranks)."""
    micro = len(indices) // (world * accum)
    return [
        list(indices[(k * world + rank) * micro : (k * world + rank + 1) * micro])
        for k in range(accum)
    ]


def n_loss_tokens(example: Example) -> int:
    """Tokens that contribute to the loss (labels after the causal shift)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (padding ignored)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
