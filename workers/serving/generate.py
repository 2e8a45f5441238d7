"""Greedy completions for a batch whose rows use different adapter slots (one pass per step)."""

from __future__ import annotations

from typing import Any

from torch import nn

from workers.serving.decode import DecodeRow
from workers.serving.multi_lora import MultiLoraLinear
from workers.serving.stepper import decode_batch


def generate_mixed(
    model: nn.Module,
    tokenizer: Any,
    layers: dict[str, MultiLoraLinear],
    prompts: list[str],
    slots: list[int],
    *,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
) -> list[str]:
    """Complete every prompt greedily with the adapter in its slot, all rows in one decode.

    Every decoding step is one forward pass over the whole batch: rows for different adapters
    share the base GEMMs; each row's LoRA update is gathered from its slot.
    """
    if len(prompts) != len(slots):
        raise ValueError("one slot per prompt")
    rows = [
        DecodeRow(
            prompt_ids=tokenizer(p)["input_ids"],
            slot=s,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            deltas=False,  # nothing reads the text before the end
        )
        for p, s in zip(prompts, slots, strict=True)
    ]
    return [o.text for o in decode_batch(model, tokenizer, layers, rows)]
