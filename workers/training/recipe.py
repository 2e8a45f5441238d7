"""One adapter on a model: the training core's driver for a job alone.

``LoraFinetuneRecipe`` injects the LoRA layers (any variant: LoRA, DoRA, AdaLoRA, over a
quantized base), builds AdamW over them and hands one ``Member`` to the core's ``Trainer``,
which owns the step and the run loop (``workers.training.core``). Single-process and Ray Train
workers use it alike: distribution enters only through ``world``/``rank`` (which
micro-batches of each global batch this worker takes) and ``all_reduce`` (summing gradients
and statistics across workers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.errors import TrainingError
from workers.lora import LoraConfig, inject_lora, lora_parameters
from workers.lora.adalora import RankAllocator, orthogonal_regularizer
from workers.lora.inject import lora_modules
from workers.lora.io import load_adapter
from workers.lora.quant import QuantReport, quantize_base
from workers.training.core import AllReduce, Member, RunHooks, Trainer, frozen_copy
from workers.training.objectives import Objective, Supervised
from workers.training.settings import StepReport, TrainConfig

__all__ = ["AllReduce", "LoraFinetuneRecipe", "StepReport", "TrainConfig", "TrainResult"]


@dataclass
class TrainResult:
    """Loss curve, eval losses and throughput of a finished run."""

    steps: int
    curve: list[StepReport] = field(default_factory=list)
    eval_loss_initial: float | None = None
    eval_loss_final: float | None = None
    tokens_per_s: float = 0.0
    train_time_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "eval_loss_initial": self.eval_loss_initial,
            "eval_loss_final": self.eval_loss_final,
            "tokens_per_s": self.tokens_per_s,
            "train_time_s": self.train_time_s,
            "curve": [r.as_curve_point() for r in self.curve],
        }


class _Callback(RunHooks):
    def __init__(self, on_report: Callable[[StepReport], None] | None) -> None:
        self.on_report_fn = on_report
        self.reports: list[StepReport] = []

    def on_report(self, member: Member, report: StepReport) -> None:
        self.reports.append(report)
        if self.on_report_fn is not None:
            self.on_report_fn(report)


class LoraFinetuneRecipe:
    """Fine-tune one adapter on a frozen base.

    Args:
        model: the base causal LM (frozen in place; LoRA layers are injected by ``setup``).
        lora: LoRA hyperparameters.
        train: optimisation settings.
        pad_id: padding token id.
        world, rank: how many workers share each global batch, and which one this is.
        all_reduce: sums a list of tensors in place across workers (identity when alone).
        device: where batches go (the model must already be there).
        objective: the method (default: supervised cross-entropy).
        tokenizer: the base's tokenizer (reinforcement samples with it).
    """

    KEY = "job"

    def __init__(
        self,
        model: nn.Module,
        lora: LoraConfig,
        train: TrainConfig,
        *,
        pad_id: int,
        world: int = 1,
        rank: int = 0,
        all_reduce: AllReduce | None = None,
        device: torch.device | str = "cpu",
        objective: Objective | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.lora = lora
        self.cfg = train
        self.objective = objective or Supervised()
        self.trainer = Trainer(model, pad_id=pad_id, world=world, rank=rank, tokenizer=tokenizer,
                               all_reduce=all_reduce, device=device)  # fmt: skip
        self.member: Member | None = None
        self.quant: QuantReport | None = None  # the base's quantization, when asked for
        self.allocator: RankAllocator | None = None  # AdaLoRA's rank budget

    # -- setup --------------------------------------------------------------------------
    def setup(self, *, inject: bool = True, init_adapter: str | Path | None = None) -> None:
        """Seed, inject LoRA (A random, B zero: the model starts exactly at the base) and
        build AdamW over the LoRA parameters only.

        Args:
            inject: False when the layers are already in the model (a sharded base).
            init_adapter: a PEFT-format adapter directory to start from (a warm start; its
                config must be ``lora``'s). A method with a reference model then uses a
                frozen copy of it as the reference, not the base.

        Raises:
            TrainingError: no LoRA parameters; AdapterFormatError: an init adapter that does
                not fit the model's layers.
        """
        torch.manual_seed(self.cfg.seed)
        if inject:
            inject_lora(self.model, self.lora)
        if self.lora.base_quantization != "none":
            self.quant = quantize_base(self.model, self.lora.base_quantization)
        params = lora_parameters(self.model)
        if not params:
            raise TrainingError("the model has no LoRA parameters to train")
        modules = lora_modules(self.model)
        reference = None
        if init_adapter is not None:
            load_adapter(self.model, init_adapter)
            if self.objective.needs_reference:
                reference = frozen_copy(modules)
        regularizer = after_step = None
        if self.lora.adalora is not None:
            allocator = self.allocator = RankAllocator(modules, self.lora.adalora, self.lora.r)
            weight = allocator.schedule.orth_reg

            def regularizer() -> torch.Tensor:
                return orthogonal_regularizer(allocator.layers) * weight

            after_step = allocator.step
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.member = Member(self.KEY, self.cfg, self.objective, (), modules, params, optimizer,
                             reference=reference, regularizer=regularizer,
                             after_step=after_step)  # fmt: skip

    def _member(self) -> Member:
        assert self.member is not None, "call setup() first"
        self.trainer.members.setdefault(self.KEY, self.member)
        return self.member

    # -- the core, for one member ---------------------------------------------------------
    @property
    def params(self) -> list[torch.Tensor]:
        return self._member().params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._member().optimizer

    @property
    def step(self) -> int:
        return self._member().step

    @step.setter
    def step(self, value: int) -> None:
        self._member().step = value

    @property
    def global_batch(self) -> int:
        return self.trainer.global_batch(self._member())

    def train_step(self, items: Sequence[Any]) -> StepReport:
        """One optimizer step over global batch number ``self.step``."""
        member = self._member()
        member.items = items
        return self.trainer.step()[self.KEY]

    def evaluate(self, items: Sequence[Any], *, batch_size: int = 32) -> float:
        """Mean loss per unit over ``items`` (this worker's share when world > 1)."""
        return self.trainer.evaluate(self._member().key, items, batch_size=batch_size).loss

    def train(
        self,
        train_items: Sequence[Any],
        eval_items: Sequence[Any] = (),
        *,
        on_report: Callable[[StepReport], None] | None = None,
        hooks: RunHooks | None = None,
    ) -> TrainResult:
        """Run steps from ``self.step`` to ``max_steps``, evaluating every ``eval_every``."""
        member = self._member()
        member.items, member.eval_items = train_items, eval_items
        self.trainer.members.pop(self.KEY, None)
        self.trainer.add(member)  # validates the data against the batch
        callback = hooks or _Callback(on_report)
        self.trainer.run(callback)
        self.trainer.members.setdefault(self.KEY, member)  # it left at its last step
        rate = member.tokens / member.train_s if member.train_s else 0.0
        result = TrainResult(steps=self.cfg.max_steps, eval_loss_initial=member.eval_initial,
                             eval_loss_final=member.last_eval, train_time_s=member.train_s,
                             tokens_per_s=rate)  # fmt: skip
        if isinstance(callback, _Callback):
            result.curve = callback.reports
        return result
