"""The LoRA fine-tuning recipe, read top to bottom: setup → train (step, evaluate) → state.

Single-process and Ray Train workers run this same code. Distribution enters through two
small hooks only: ``world``/``rank`` choose this worker's micro-batches of each global batch,
and ``all_reduce`` sums the LoRA gradients (and the loss) across workers. Each micro-batch's
loss is a token *sum* divided by the number of loss tokens in the whole global batch, so the
summed gradient equals one process's gradient over the global batch exactly, however the batch
is split over workers and accumulation steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from workers.datasets import Example
from workers.errors import TrainingError
from workers.lora import LoraConfig, inject_lora, lora_parameters
from workers.lora.adalora import RankAllocator, orthogonal_regularizer
from workers.lora.inject import lora_modules
from workers.lora.quant import QuantReport, quantize_base
from workers.training.batches import (
    collate,
    global_batch_indices,
    n_loss_tokens,
    rank_micro_batches,
    steps_per_epoch,
)
from workers.training.loss import causal_lm_loss_sum
from workers.training.schedule import lr_at

log = logging.getLogger(__name__)

AllReduce = Callable[[list[torch.Tensor]], None]  # sums tensors in place across workers


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
            "curve": [asdict(r) for r in self.curve],
        }


def _no_reduce(_: list[torch.Tensor]) -> None:
    return None


class LoraFinetuneRecipe:
    """Fine-tune LoRA weights on a frozen base.

    Args:
        model: the base causal LM (frozen in place; LoRA layers are injected by ``setup``).
        lora: LoRA hyperparameters.
        train: optimisation settings.
        pad_id: padding token id.
        world, rank: how many workers share each global batch, and which one this is.
        all_reduce: sums a list of tensors in place across workers (identity when alone).
        device: where batches go (the model must already be there).
    """

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
    ) -> None:
        self.model = model
        self.lora = lora
        self.cfg = train
        self.pad_id = pad_id
        self.world = world
        self.rank = rank
        self.all_reduce = all_reduce or _no_reduce
        self.device = torch.device(device)
        self.step = 0
        self.params: list[torch.Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.quant: QuantReport | None = None  # the base's quantization, when asked for
        self.allocator: RankAllocator | None = None  # AdaLoRA's rank budget

    # -- setup --------------------------------------------------------------------------
    def setup(self, *, inject: bool = True) -> None:
        """Seed, inject LoRA (A random, B zero: the model starts exactly at the base), and
        build AdamW over the LoRA parameters only."""
        torch.manual_seed(self.cfg.seed)
        if inject:
            inject_lora(self.model, self.lora)
        if self.lora.base_quantization != "none":
            self.quant = quantize_base(self.model, self.lora.base_quantization)
        self.params = lora_parameters(self.model)
        if not self.params:
            raise TrainingError("the model has no LoRA parameters to train")
        if self.lora.adalora is not None:
            self.allocator = RankAllocator(lora_modules(self.model), self.lora.adalora,
                                           self.lora.r)  # fmt: skip
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )

    # -- train ----------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            return causal_lm_loss_sum(self.model, batch)

    def train_step(self, examples: Sequence[Example]) -> StepReport:
        """One optimizer step over global batch number ``self.step``."""
        assert self.optimizer is not None, "call setup() first"
        t0 = time.perf_counter()
        self.model.train()
        indices = global_batch_indices(
            self.step, n_examples=len(examples), global_batch=self.global_batch, seed=self.cfg.seed
        )
        denom = sum(n_loss_tokens(examples[i]) for i in indices)
        lr = lr_at(
            self.step,
            peak=self.cfg.lr,
            warmup=self.cfg.warmup_steps,
            total=self.cfg.max_steps,
            min_ratio=self.cfg.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The RNG (dropout) is a pure function of (seed, step, rank): a resumed run draws
        # exactly what the uninterrupted one would have, with no RNG state to checkpoint.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * 1_009 + self.rank)
        self.optimizer.zero_grad(set_to_none=False)
        loss_total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        micro = rank_micro_batches(
            indices, world=self.world, rank=self.rank, accum=self.cfg.grad_accum
        )
        for mb in micro:
            batch = collate([examples[i] for i in mb], self.pad_id)
            tokens += int(batch["attention_mask"].sum())
            loss_sum = self._loss_sum(batch)
            (loss_sum / denom).backward()
            loss_total += loss_sum.detach().double().cpu()
        if self.allocator is not None:  # AdaLoRA keeps P and Q orthogonal (per worker: 1/world)
            weight = self.allocator.schedule.orth_reg / self.world
            (orthogonal_regularizer(self.allocator.layers) * weight).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        stat = torch.stack([loss_total, torch.tensor(float(tokens), dtype=torch.float64)])
        self.all_reduce([*grads, stat])
        loss = float(stat[0]) / denom
        if not math.isfinite(loss):
            raise TrainingError(f"loss is not finite at step {self.step} ({loss}); lower lr")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.step += 1
        if self.allocator is not None:  # scores from this step's gradients, then prunes
            self.allocator.step(self.step)
        elapsed = time.perf_counter() - t0
        all_tokens = int(stat[1])
        return StepReport(
            step=self.step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=all_tokens,
            tokens_per_s=all_tokens / elapsed if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
        )

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], *, batch_size: int = 32) -> float:
        """Mean per-token loss over ``examples`` (this worker's share when world > 1)."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        mine = list(examples)[self.rank :: self.world]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            total[0] += float(self._loss_sum(collate(chunk, self.pad_id)))
            total[1] += sum(n_loss_tokens(e) for e in chunk)
        self.all_reduce([total])
        self.model.train(was_training)
        return float(total[0] / total[1]) if total[1] else float("nan")

    def train(
        self,
        train_examples: Sequence[Example],
        eval_examples: Sequence[Example] = (),
        *,
        on_report: Callable[[StepReport], None] | None = None,
    ) -> TrainResult:
        """Run steps from ``self.step`` to ``max_steps``, evaluating every ``eval_every``."""
        steps_per_epoch(len(train_examples), self.global_batch)  # fail early on a tiny dataset
        result = TrainResult(steps=self.cfg.max_steps)
        if eval_examples:
            result.eval_loss_initial = self.evaluate(eval_examples)
        t0 = time.perf_counter()
        tokens = 0
        while self.step < self.cfg.max_steps:
            report = self.train_step(train_examples)
            tokens += report.tokens
            last = self.step == self.cfg.max_steps
            if eval_examples and (
                last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            ):
                report.eval_loss = self.evaluate(eval_examples)
            result.curve.append(report)
            if on_report is not None:
                on_report(report)
        result.train_time_s = time.perf_counter() - t0
        result.tokens_per_s = tokens / result.train_time_s if result.train_time_s else 0.0
        if eval_examples and result.curve:
            result.eval_loss_final = result.curve[-1].eval_loss
        return result
