"""A PEFT-made DoRA adapter with non-trivial weights: the oracle several tests load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def peft_dora_adapter(
    base_dir: Path, out_dir: Path, targets: list[str], *, seed: int, scale: float
) -> Any:
    """PEFT's DoRA (r 4, alpha 8) on ``targets`` with B and the magnitude moved by
    N(0, scale²) noise, saved to ``out_dir``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    from workers.base_model import load_base

    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                     target_modules=targets)  # fmt: skip
    model = get_peft_model(load_base(base_dir)[0], cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out_dir)
    return model
