"""Training settings and what one step reports: plain data, shared by every driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from workers.errors import TrainingError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is per worker and per micro-step."""

    max_steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 50
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name}: must be an integer ≥ 1, got {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise TrainingError(f"lr: must be in (0, 1), got {self.lr!r}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name}: must be ≥ 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError("min_lr_ratio: must be in [0, 1]")
        if self.max_grad_norm <= 0:
            raise TrainingError("max_grad_norm: must be > 0")


@dataclass
class StepReport:
    """What one optimizer step reports (also the shape of ``metrics.json``'s curve)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (DPO's rewards)

    def as_curve_point(self) -> dict[str, Any]:
        """The point ``metrics.json``'s curve and the metrics events carry (flat: TRL's
        metric names sit beside the loss)."""
        point = {k: v for k, v in asdict(self).items() if k != "metrics"}
        return {**point, **self.metrics}
