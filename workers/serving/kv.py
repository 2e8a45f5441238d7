"""A KV cache with one row per running sequence, for iteration-level (continuous) batching.

Every attention layer keeps K and V as ``(rows, kv_heads, length + 1, head_dim)`` buffers. A
sequence owns one row for its lifetime; rows join and leave between forward passes. One
forward covers any subset of rows: each row writes its new keys at its own positions and
attends only to its own ``[0, position]`` (a 4-D mask, which transformers passes through to
the attention kernel untouched). Sequences of different lengths therefore share a forward
without recomputing anything, and a row decodes exactly what it decodes alone.

Queries of a forward are *right-aligned*: row ``i`` with ``q`` new tokens occupies the last
``q`` query positions, so the last position of every row is its newest token (the logits
a step needs are always at ``-1``). Padding queries before them write to a scratch column
(index ``length``) that no mask ever lets anyone read.

Why rows and not pages: on a CPU, padded attention over a few rows costs less than the
gather a paged layout needs, and the budget is simple to state (``rows × length`` tokens,
checked at admission). The price is padding: a row's buffer is as long as the longest
admitted sequence needs. ``bench/serving.py`` measures the result against transformers'
own paged continuous batching. Sharing happens by copying ranges of positions: a cached
prefix is written into a row (``write``), a prompt's KV is read out for the prefix cache
(``read``), and the ``n`` rows of one request copy their first row's prompt (``copy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def kv_layout(config: Any, dtype: torch.dtype) -> tuple[int, int, torch.dtype]:
    """(kv_heads, head_dim, dtype) of one layer's keys for a decoder ``config``."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim, dtype


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token of one sequence takes in the KV cache of a decoder ``config``."""
    kv_heads, head_dim, _ = kv_layout(config, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * size


def row_mask(
    positions: torch.Tensor, real: torch.Tensor, kv_len: int, *, additive: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The 4-D attention mask ``(rows, 1, T, kv_len)`` of a row-cache forward.

    ``positions[i, t]`` is the cache position query ``t`` of row ``i`` writes; a real query
    sees its row's positions ``0 … positions[i, t]``; a padding query (``real`` false) sees
    position 0 only, so it never yields an empty softmax. ``additive``: the float form eager
    attention adds to its scores (0 or the dtype's minimum) instead of booleans.
    """
    cols = torch.arange(kv_len, device=positions.device)
    limit = torch.where(real, positions, torch.zeros_like(positions))
    allowed = cols[None, None, :] <= limit[:, :, None]
    allowed = allowed[:, None, :, :]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class RowKVCache:
    """K/V buffers with one row per sequence; the model calls ``update`` once per layer.

    Call ``begin`` before each forward to say which rows it covers and where each writes.
    Buffers are sized by ``resize`` and are dropped with ``release`` when idle.
    """

    def __init__(
        self, n_layers: int, *, device: torch.device | str = "cpu",
        layout: tuple[int, int, torch.dtype] | None = None,
    ) -> None:  # fmt: skip
        """``layout``: (kv_heads, head_dim, dtype), to allocate at ``resize``; without it the
        buffers are allocated by the first ``update`` (from the keys it gets)."""
        self.n_layers = n_layers
        self.device = torch.device(device)
        self.layout = layout
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.rows = 0  # rows the buffers hold
        self.length = 0  # positions per row (the scratch column comes on top)
        self._read: slice | torch.Tensor = slice(0, 0)
        self._write_rows = torch.zeros(0, dtype=torch.long)
        self._write_pos = torch.zeros(0, dtype=torch.long)
        self._kv_len = 0

    # -- capacity --------------------------------------------------------------------------
    def resize(self, rows: int, length: int) -> None:
        """Hold ``rows`` rows of ``length`` positions, keeping what the overlap stores.

        Shrinking is allowed (the caller knows no running row needs what is cut off): the
        buffers never grow past what the last resize asked, which is what keeps the KV
        memory within the budget the caller enforces.
        """
        if rows == self.rows and length == self.length:
            return
        keep_rows, keep_len = min(rows, self.rows), min(length, self.length)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                if old is None:  # allocated when first written (admission resizes often)
                    continue
                new = old.new_zeros((rows, old.shape[1], length + 1, old.shape[3]))
                new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]
                store[i] = new
        self.rows, self.length = rows, length

    def release(self) -> None:
        """Drop the buffers (nothing is running); the next ``resize`` starts afresh."""
        self.k = [None] * self.n_layers
        self.v = [None] * self.n_layers
        self.rows = self.length = 0

    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (to keep running rows contiguous)."""
        for store in (self.k, self.v):
            for t in store:
                if t is not None:
                    t[dst] = t[src]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions ``0:length`` of row ``src`` into row ``dst`` (one prompt, n rows)."""
        for store in (self.k, self.v):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Positions ``start:end`` of ``row``: ``(layers, 2, kv_heads, end - start, head_dim)``."""
        if any(t is None for t in self.k):
            raise RuntimeError("the buffers are not allocated")
        return torch.stack([torch.stack((k[row, :, start:end], v[row, :, start:end]))  # type: ignore[index]
                            for k, v in zip(self.k, self.v, strict=True)])  # fmt: skip

    def _allocate(self) -> None:
        """Allocate the buffers of the current size (before anything wrote to them)."""
        if self.layout is None:
            raise RuntimeError("the buffers are not allocated: give the cache a layout")
        heads, dim, dtype = self.layout
        shape = (self.rows, heads, self.length + 1, dim)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is None:
                    store[i] = torch.zeros(shape, dtype=dtype, device=self.device)

    def write(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Put ``kv`` (as ``read`` returns it) at positions ``start:`` of ``row``."""
        if any(t is None for t in self.k):
            self._allocate()
        end = start + kv.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[row, :, start:end] = kv[i, 0]  # type: ignore[index]
            v[row, :, start:end] = kv[i, 1]  # type: ignore[index]

    # -- one forward -----------------------------------------------------------------------
    def begin(
        self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], *,
        additive: bool = False, dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Prepare a forward over ``rows``: row ``rows[i]`` holds ``starts[i]`` positions and
        gets ``counts[i]`` new tokens. Returns ``(position_ids, attention_mask)``."""
        n, t = len(rows), max(counts)
        if any(s + c > self.length for s, c in zip(starts, counts, strict=True)):
            raise ValueError("resize() the cache before a forward that outgrows it")
        dev = self.device
        q = torch.arange(t, device=dev)[None, :]
        counts_t = torch.tensor(list(counts), device=dev)[:, None]
        starts_t = torch.tensor(list(starts), device=dev)[:, None]
        real = q >= t - counts_t  # right-aligned: padding first
        positions = starts_t + q - (t - counts_t)
        self._write_pos = torch.where(real, positions, torch.full_like(positions, self.length))
        rows_t = torch.tensor(list(rows), device=dev)
        self._write_rows = rows_t[:, None].expand(n, t)
        lo = min(rows)
        contiguous = list(rows) == list(range(lo, lo + n))
        self._read = slice(lo, lo + n) if contiguous else rows_t
        self._kv_len = max(s + c for s, c in zip(starts, counts, strict=True))
        mask = row_mask(positions, real, self._kv_len, additive=additive, dtype=dtype)
        return torch.where(real, positions, torch.zeros_like(positions)), mask

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Store this forward's keys and values; return the rows' keys and values so far.

        (The signature transformers' attention layers call: ``cache.update(k, v, layer)``.)
        """
        if self.k[layer_idx] is None:
            shape = (self.rows, key_states.shape[1], self.length + 1, key_states.shape[3])
            self.k[layer_idx] = key_states.new_zeros(shape)
            self.v[layer_idx] = value_states.new_zeros(shape)
        k, v = self.k[layer_idx], self.v[layer_idx]
        assert k is not None and v is not None
        k[self._write_rows, :, self._write_pos] = key_states.transpose(1, 2)
        v[self._write_rows, :, self._write_pos] = value_states.transpose(1, 2)
        return k[self._read, :, : self._kv_len], v[self._read, :, : self._kv_len]
