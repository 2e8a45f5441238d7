"""Greedy decoding for a base, an adapted or a merged model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """Complete each prompt greedily; returns only the new text, stopped at EOS.

    Prompts are left-padded into batches, so a batch decodes in one ``generate`` call.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be ≥ 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            gen = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs
