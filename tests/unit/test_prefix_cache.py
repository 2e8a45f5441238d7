"""The prefix cache on hand-made KV blocks: keys, reuse, LRU order, per-version removal."""

from __future__ import annotations

import torch

from workers.serving.prefix_cache import PrefixCache, block_keys, prefix_root, reusable_tokens

B = 4  # block tokens


def _kv(start: int, end: int) -> torch.Tensor:
    """A row's KV whose every value is its position: (layers=1, 2, heads=1, positions, dim=1)."""
    pos = torch.arange(start, end, dtype=torch.float32)
    return pos.view(1, 1, 1, -1, 1).expand(1, 2, 1, -1, 1).clone()


def test_keys_name_the_base_the_exact_version_and_every_token_before() -> None:
    base = prefix_root("fp-base", None, None)
    a1 = prefix_root("fp-base", "t/a:1", "d1")
    assert (
        len({base, a1, prefix_root("fp-base", "t/a:2", "d2"), prefix_root("fp-other", None, None)})
        == 4
    )
    assert prefix_root("fp-base", "t/a:1", "d-other") != a1  # same ref, other bytes
    tokens = list(range(10))
    keys = block_keys(a1, tokens, B)
    assert len(keys) == 2  # a partial block has no key
    assert block_keys(a1, [*tokens[:4], 99, *tokens[5:]], B)[1] != keys[1]  # depends on block 1
    assert block_keys(a1, [*tokens[:7], 99], B)[0] == keys[0]
    assert reusable_tokens(3, 12, B) == 8  # the last prompt token is always prefilled


def test_a_prefix_is_reused_only_under_its_own_root() -> None:
    cache = PrefixCache(B)
    root, other = prefix_root("fp", "t/a:1", "d"), prefix_root("fp", "t/b:1", "d")
    prompt = list(range(11))
    assert cache.insert("t/a:1", root, prompt, _kv) == 2
    assert cache.tokens == 8
    assert cache.peek(root, prompt) == 8 and cache.peek(other, prompt) == 0
    assert cache.peek(root, [*prompt[:5], 77, *prompt[6:]]) == 4  # diverges in block 2
    n, kv = cache.take(root, [*prompt, 11, 12])
    assert n == 8 and kv is not None and kv[0, 0, 0, :, 0].tolist() == list(range(8))
    assert cache.take(other, prompt) == (0, None)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.hit_tokens) == (1, 1, 8)
    assert cache.insert("t/a:1", root, prompt, _kv) == 0  # already there


def test_eviction_takes_a_chain_from_its_end_and_drop_takes_a_version() -> None:
    cache = PrefixCache(B)
    a, b = prefix_root("fp", "t/a:1", "d"), prefix_root("fp", None, None)
    cache.insert("t/a:1", a, list(range(12)), _kv)  # 3 blocks
    cache.insert("", b, list(range(8)), _kv)  # 2 blocks, newer
    assert cache.tokens == 20
    cache.evict(4)
    # the oldest block is a's deepest one: a keeps 2 blocks, reusable for 8 tokens
    assert cache.peek(a, list(range(13))) == 8 and cache.peek(b, list(range(9))) == 8
    assert cache.drop("t/a:1") == 2 and cache.peek(a, list(range(13))) == 0
    assert cache.owners() == {"": 2} and cache.tokens == 8
