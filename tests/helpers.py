"""Helpers several test modules share (no fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def random_adapter(base_dir: Path, out: Path, seed: int, *, r: int = 4,
                   targets: Any = ("q_proj", "v_proj"), scale: float = 0.02,
                   **kw: Any) -> Path:  # fmt: skip
    """A LoRA adapter of ``base_dir`` with seeded random B (so it changes the answers), saved
    to ``out``; ``kw``: more ``LoraConfig`` fields."""
    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter

    model, _ = load_base(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, alpha=2 * r, target_modules=targets, **kw)
    inject_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, scale)
    return save_adapter(model, cfg, out)


def masked_decode(cache: Any, grammar: str, seed: int, steps: int = 400) -> str:
    """Greedy over random logits, masked by ``grammar`` (a ``GrammarCache``'s): the grammar
    alone decides what is valid."""
    g = torch.Generator().manual_seed(seed)
    row = cache.row(grammar)
    tok = cache.tokenizer
    out: list[int] = []
    for _ in range(steps):
        logits = torch.randn(cache.vocab_size, generator=g)
        row.mask(logits)
        t = int(logits.argmax())
        if t == tok.eos_token:
            break
        row.advance(t)
        out.append(t)
        if row.finished:
            break
    assert row.error is None
    return bytes(tok.decode_bytes(out)).decode()
