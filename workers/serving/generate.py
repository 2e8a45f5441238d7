"""Greedy generation for a batch whose rows use different adapter slots (KV cache kept)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.serving.multi_lora import MultiLoraLinear, set_batch_slots


@torch.no_grad()
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
    """Complete every prompt with the adapter in its slot, all rows in one batched decode.

    Every decoding step is one forward pass over the whole batch: rows for different adapters
    share the base GEMMs; each row's LoRA update is gathered from its slot.
    """
    if len(prompts) != len(slots):
        raise ValueError("one slot per prompt")
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    set_batch_slots(layers, torch.tensor(slots, device=device))
    try:
        out = model.generate(  # type: ignore[operator]
            **enc,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        set_batch_slots(layers, None)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
