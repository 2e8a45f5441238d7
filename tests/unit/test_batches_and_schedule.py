"""Data order, per-rank splitting, padding, and the learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from workers.datasets import IGNORE_INDEX, Example
from workers.errors import DatasetError
from workers.training.batches import (
    collate,
    global_batch_indices,
    rank_micro_batches,
    steps_per_epoch,
)
from workers.training.schedule import lr_at


def test_global_batches_are_deterministic_and_cover_an_epoch():
    n, gb = 20, 4
    epoch = [
        i for s in range(5) for i in global_batch_indices(s, n_examples=n, global_batch=gb, seed=7)
    ]
    assert sorted(epoch) == list(range(20))
    assert epoch == [
        i for s in range(5) for i in global_batch_indices(s, n_examples=n, global_batch=gb, seed=7)
    ]
    next_epoch = global_batch_indices(5, n_examples=n, global_batch=gb, seed=7)
    assert next_epoch != epoch[:4]  # a fresh permutation each epoch
    assert global_batch_indices(0, n_examples=n, global_batch=gb, seed=8) != epoch[:4]


def test_rank_micro_batches_partition_the_global_batch():
    indices = list(range(12))
    parts = [rank_micro_batches(indices, world=2, rank=r, accum=3) for r in range(2)]
    flat = sorted(i for p in parts for mb in p for i in mb)
    assert flat == indices
    assert all(len(mb) == 2 for p in parts for mb in p)


def test_global_batch_larger_than_dataset():
    with pytest.raises(DatasetError, match="larger than the dataset"):
        steps_per_epoch(3, 4)


def test_collate_pads_and_ignores_padding():
    b = collate([Example((1, 2, 3), (IGNORE_INDEX, 2, 3)), Example((4,), (4,))], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"][1].tolist() == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert b["input_ids"].dtype == torch.long


def test_lr_warmup_then_cosine():
    kw = dict(peak=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
