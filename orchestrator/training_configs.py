"""The one mapping from a job spec's sections to the trainer's configurations.

The job runner and ``lorafleet train`` both build their ``LoraConfig`` and ``TrainConfig``
here, so a variant (DoRA, AdaLoRA), a quantized base or a target rule means the same thing
through every door.
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec import LoraSpec, TrainingSpec
from workers.lora import LoraConfig
from workers.lora.config import AdaLoraSchedule
from workers.training.settings import TrainConfig


def lora_config(lora: LoraSpec, *, max_steps: int) -> LoraConfig:
    """The trainer's LoRA configuration for a spec's ``lora`` section (AdaLoRA's budget
    schedule spans ``max_steps``)."""
    raw = lora.targets
    targets: Any = raw.removeprefix("re:") if isinstance(raw, str) else tuple(raw)
    adalora = (AdaLoraSchedule.for_steps(lora.adalora_target_r, max_steps)
               if lora.variant == "adalora" else None)  # fmt: skip
    return LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets,
                      use_rslora=lora.rslora, use_dora=lora.variant == "dora",
                      base_quantization=lora.base_quantization, adalora=adalora)  # fmt: skip


def train_config(t: TrainingSpec, *, n_rows: int, workers: int) -> TrainConfig:
    """The trainer's optimisation settings; ``epochs`` becomes steps over ``n_rows`` rows."""
    steps = t.max_steps
    if steps is None:
        per_step = t.batch_size * t.grad_accum * workers
        steps = max(1, int((t.epochs or 1.0) * n_rows / per_step))
    return TrainConfig(
        max_steps=steps, lr=t.lr, warmup_steps=min(t.warmup_steps, steps), batch_size=t.batch_size,
        grad_accum=t.grad_accum, seq_len=t.seq_len, seed=t.seed, eval_every=t.eval_every,
    )  # fmt: skip
