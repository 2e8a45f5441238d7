"""A prefix cache in KV blocks, keyed by the base, the exact adapter version and the tokens.

A prompt is cut into blocks of ``block`` tokens. Block ``i`` is named by a hash chain,

    key_0 = root = sha256(base fingerprint, adapter version, adapter bytes' digest)
    key_i = sha256(key_{i-1} ‖ tokens of block i),

so a key stands for the whole prefix up to the end of its block *and* for the weights that
computed it: LoRA changes every layer's keys and values, so one adapter's KV is never another
adapter's (or the base's), and a version whose bytes differ has another root (vLLM hashes its
blocks with the LoRA id in the key the same way). A block holds every layer's K and V for its
tokens, ``(layers, 2, kv_heads, block, head_dim)``.

A prompt that starts with cached blocks copies them into its KV row and prefills only the rest
(at least its last token, whose logits choose the first new token). The cache lives inside
the replica's KV budget: running rows come first, the cache holds what is left, least recently
used blocks go first (a prefix's deeper blocks are touched before its shallower ones, so a
chain is evicted from its end, never cut in the middle). Every block has an owner (the exact
adapter version, "" for the base); ``drop(owner)`` removes a version's blocks when it is
unloaded or deleted.

Why copy, not share: the engine keeps one contiguous KV row per sequence (``kv.py``), which on
a CPU beats gathering pages every step; a copy of a cached prefix costs a memory move, far
less than the forward pass it replaces.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

BLOCK_TOKENS = 16


def prefix_root(base_fingerprint: str, adapter: str | None, adapter_digest: str | None) -> bytes:
    """The root of a hash chain: the base and the exact adapter version (None: the base)."""
    text = f"lorafleet-prefix\0{base_fingerprint}\0{adapter or ''}\0{adapter_digest or ''}"
    return hashlib.sha256(text.encode()).digest()


def block_keys(root: bytes, tokens: Sequence[int], block: int) -> list[bytes]:
    """The keys of the whole blocks of ``tokens`` (a partial last block has none)."""
    keys, h = [], root
    for i in range(len(tokens) // block):
        chunk = tokens[i * block : (i + 1) * block]
        h = hashlib.sha256(h + b"".join(int(t).to_bytes(4, "little") for t in chunk)).digest()
        keys.append(h)
    return keys


def reusable_tokens(cached_blocks: int, prompt_len: int, block: int) -> int:
    """Prompt tokens a request may take from ``cached_blocks`` leading blocks: whole blocks,
    and never the last prompt token (its logits choose the first new token)."""
    return min(cached_blocks, (prompt_len - 1) // block) * block


@dataclass
class PrefixStats:
    hits: int = 0  # requests that reused at least one block
    misses: int = 0  # requests that could have and found none
    hit_tokens: int = 0  # prompt tokens taken from the cache
    miss_tokens: int = 0  # prompt tokens of those requests prefilled instead
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    dropped_blocks: int = 0  # removed with their adapter version


@dataclass
class _Block:
    owner: str
    kv: torch.Tensor  # (layers, 2, kv_heads, block, head_dim)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.kv.numel() * self.kv.element_size()


class PrefixCache:
    """Cached KV blocks in LRU order. Not thread-safe: the decode loop owns it."""

    def __init__(self, block: int = BLOCK_TOKENS) -> None:
        if block < 1:
            raise ValueError("block: at least one token")
        self.block = block
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest first
        self._owned: dict[str, set[bytes]] = {}
        self.stats = PrefixStats()

    @property
    def tokens(self) -> int:
        """Token positions the cache holds (what it takes of the KV budget)."""
        return len(self._blocks) * self.block

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def _depth(self, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            if key not in self._blocks:
                break
            n += 1
        return n

    def peek(self, root: bytes, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens`` a request could reuse now (no LRU change, no counting)."""
        if len(tokens) <= self.block or not self._blocks:
            return 0
        keys = block_keys(root, tokens[: len(tokens) - 1], self.block)
        return reusable_tokens(self._depth(keys), len(tokens), self.block)

    def take(self, root: bytes, tokens: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The reusable prefix of ``tokens``: its length and its KV ``(layers, 2, kv_heads,
        length, head_dim)`` (None when nothing is cached). Counts a hit or a miss."""
        keys = block_keys(root, tokens[: max(len(tokens) - 1, 0)], self.block)
        depth = self._depth(keys)
        n = reusable_tokens(depth, len(tokens), self.block)
        if n == 0:
            self.stats.misses += 1
            self.stats.miss_tokens += len(tokens)
            return 0, None
        used = keys[: n // self.block]
        for key in reversed(used):  # deepest first: the root ends most recently used
            self._blocks.move_to_end(key)
        self.stats.hits += 1
        self.stats.hit_tokens += n
        self.stats.miss_tokens += len(tokens) - n
        return n, torch.cat([self._blocks[k].kv for k in used], dim=3)

    def miss(self, tokens: int) -> None:
        """Count a request that could have reused a prefix and prefills all ``tokens``."""
        self.stats.misses += 1
        self.stats.miss_tokens += tokens

    def insert(
        self, owner: str, root: bytes, tokens: Sequence[int],
        read: Callable[[int, int], torch.Tensor],
    ) -> int:  # fmt: skip
        """Cache the whole blocks of ``tokens`` not cached yet; ``read(start, end)`` gives the
        KV of positions ``start:end`` as ``(layers, 2, kv_heads, end - start, head_dim)``.
        Returns the blocks added."""
        keys = block_keys(root, tokens, self.block)
        have = self._depth(keys)
        if have < len(keys):
            start, end = have * self.block, len(keys) * self.block
            kv = read(start, end)
            # deepest first, then the blocks already cached, root last: the LRU order runs
            # from a chain's end to its root, so eviction never cuts a chain in the middle
            for i in reversed(range(len(keys) - have)):
                key = keys[have + i]
                part = kv[:, :, :, i * self.block : (i + 1) * self.block].clone()
                self._blocks[key] = _Block(owner, part)
                self._owned.setdefault(owner, set()).add(key)
        for key in reversed(keys[:have]):
            self._blocks.move_to_end(key)
        self.stats.inserted_blocks += len(keys) - have
        return len(keys) - have

    def evict(self, tokens: int) -> int:
        """Free at least ``tokens`` positions, least recently used blocks first; returns the
        positions freed."""
        freed = 0
        while freed < tokens and self._blocks:
            key, blk = self._blocks.popitem(last=False)
            self._owned.get(blk.owner, set()).discard(key)
            freed += self.block
            self.stats.evicted_blocks += 1
        return freed

    def drop(self, owner: str) -> int:
        """Remove every block of ``owner`` (an exact adapter version); returns how many."""
        keys = self._owned.pop(owner, set())
        for key in keys:
            self._blocks.pop(key, None)
        self.stats.dropped_blocks += len(keys)
        return len(keys)

    def owners(self) -> dict[str, int]:
        """Blocks per owner."""
        return {o: len(k) for o, k in self._owned.items() if k}

    def clear(self) -> None:
        self._blocks.clear()
        self._owned.clear()
