"""Collectives for data-parallel LoRA: node grouping and one flat all-reduce per step.

Only LoRA gradients travel: they are flattened into one buffer, summed across workers with a
single ``all_reduce``, and copied back. Every call is counted (bytes and calls), which is how
tests and benchmarks prove that no base-sized traffic crosses nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def group_by_node(node_ids: list[str]) -> dict[str, list[int]]:
    """Ranks per node id, in rank order (pure; Ray's node_rank is 0 for simulated nodes)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for rank, node in enumerate(node_ids):
        groups[node].append(rank)
    return dict(groups)


@dataclass
class CommStats:
    """What the collectives of one worker sent."""

    calls: int = 0
    bytes: int = 0
    per_call: list[int] = field(default_factory=list)


class FlatAllReduce:
    """Sum a list of tensors across the default process group with one collective."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.stats = CommStats()

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype, group in by_dtype.items():  # one collective per dtype (normally one)
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(dtype)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            nbytes = flat.numel() * flat.element_size()
            self.stats.calls += 1
            self.stats.bytes += nbytes
            self.stats.per_call.append(nbytes)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def all_gather_strings(value: str) -> list[str]:
    """Every rank's ``value``, in rank order."""
    out: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
