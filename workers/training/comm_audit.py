"""Record every collective a worker issues: which op, which ranks, how many bytes.

Used by tests and benchmarks to prove where traffic goes — e.g. that with a sharded base the
only collectives spanning nodes carry LoRA gradients. It wraps the ``torch.distributed``
functions that FSDP2 and our all-reduce call, for the duration of a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_FUNCTIONS = (
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_reduce",
    "broadcast",
)


@dataclass(frozen=True)
class CollectiveCall:
    op: str
    ranks: tuple[int, ...]
    nbytes: int
    spans_nodes: bool


def _bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    # all-gather: the input is the shard sent; reduce-scatter / all-reduce: the input is sent
    t = tensors[-1] if tensors else None
    if t is None:
        return 0
    return t.numel() * t.element_size()


@contextmanager
def record_collectives(node_of_rank: list[str]) -> Iterator[list[CollectiveCall]]:
    """Yield a list that fills with one ``CollectiveCall`` per collective issued inside."""
    calls: list[CollectiveCall] = []
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
            spans = len({node_of_rank[r] for r in ranks}) > 1
            calls.append(CollectiveCall(name, ranks, _bytes(args, kwargs), spans))
            return fn(*args, **kwargs)

        return recorded

    for name in _FUNCTIONS:
        fn = getattr(dist, name, None)
        if fn is not None:
            originals[name] = fn
            setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def summarize(calls: list[CollectiveCall]) -> dict[str, Any]:
    """Bytes per (op, spans_nodes), for metrics.json."""
    out: dict[str, dict[str, int]] = {}
    for c in calls:
        key = f"{c.op}{' (spans nodes)' if c.spans_nodes else ' (within a node)'}"
        entry = out.setdefault(key, {"calls": 0, "bytes": 0})
        entry["calls"] += 1
        entry["bytes"] += c.nbytes
    return out
