"""Learning-rate schedule: linear warmup then cosine decay to ``min_ratio`` · peak."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    lr = peak · (step+1)/warmup during warmup; then
    lr = peak · (min_ratio + (1 − min_ratio) · ½(1 + cos(π · progress))).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
