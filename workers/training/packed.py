"""Packed training: several LoRA fine-tuning jobs on one frozen base, one forward per micro-step.

Each job keeps everything a solo run has — its own LoRA config (rank, alpha, targets), data
order (seed), learning-rate schedule, AdamW state, gradient clipping by its own norm, step
count and adapter — and shares only the base and its GEMMs. A micro-step concatenates every
job's micro-batch (right-padded to the longest row of the pack), runs the model once, and
sums each job's loss over its own rows divided by its own global token count; since no two
jobs share a trainable parameter, each job's gradient is exactly its solo gradient. One
all-reduce carries every job's gradients when the pack is data-parallel.

Jobs join and leave at step boundaries (``add``/``remove``): a joiner is initialised exactly
as a solo run of it would be (same seed, same creation order), so its curve is its solo curve,
and the others' curves do not change when it comes or goes.

Packing rules (``packable``): the same base and the same ``grad_accum`` (micro-steps are
shared). With LoRA dropout > 0 a packed job draws its dropout masks from the shared stream, so
its curve is equal to its solo run in distribution, not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workers.datasets import Example
from workers.errors import TrainingError
from workers.lora import LoraConfig
from workers.lora.inject import PEFT_PREFIX, match_target_modules
from workers.lora.io import save_adapter_state
from workers.lora.layer import LoraLinear
from workers.lora.packed import PackedLoraLinear, PackLayout, packed_layer
from workers.training.batches import (
    collate,
    global_batch_indices,
    n_loss_tokens,
    rank_micro_batches,
    steps_per_epoch,
)
from workers.training.loss import causal_lm_loss_sums
from workers.training.recipe import AllReduce, StepReport, TrainConfig
from workers.training.schedule import lr_at


def packable(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether two jobs on the same base can share micro-steps."""
    return a.grad_accum == b.grad_accum


@dataclass
class PackedJob:
    """One job of a pack: its configuration, data, LoRA layers, optimizer and progress."""

    key: str
    lora: LoraConfig
    cfg: TrainConfig
    examples: Sequence[Example]
    modules: dict[str, LoraLinear] = field(default_factory=dict)  # path → its LoRA layer
    params: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.max_steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The job's LoRA weights under PEFT's file keys."""
        out: dict[str, torch.Tensor] = {}
        for path, m in self.modules.items():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach()
        return out


class PackedRecipe:
    """Train several jobs' adapters on one frozen ``model`` together.

    Args:
        model: the base causal LM (frozen in place; packed layers are wrapped in as jobs join).
        pad_id: padding token id.
        world, rank, all_reduce, device: as ``LoraFinetuneRecipe``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        world: int = 1,
        rank: int = 0,
        all_reduce: AllReduce | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.world, self.rank = world, rank
        self.all_reduce = all_reduce or (lambda _: None)
        self.device = torch.device(device)
        self.layout = PackLayout()
        self.jobs: dict[str, PackedJob] = {}
        for p in model.parameters():
            p.requires_grad_(False)

    # -- membership (at step boundaries) ------------------------------------------------------
    def add(
        self, key: str, lora: LoraConfig, cfg: TrainConfig, examples: Sequence[Example]
    ) -> PackedJob:
        """Join the pack: LoRA layers created exactly as a solo run creates them.

        Raises:
            TrainingError: a duplicate key, a job that cannot share micro-steps with the pack,
                or a dataset smaller than one global batch.
        """
        if key in self.jobs:
            raise TrainingError(f"job {key} is already in the pack")
        for other in self.jobs.values():
            if not packable(other.cfg, cfg):
                raise TrainingError(f"job {key} cannot join: grad_accum {cfg.grad_accum} ≠ "
                                    f"{other.cfg.grad_accum} of job {other.key}")  # fmt: skip
        job = PackedJob(key, lora, cfg, examples)
        steps_per_epoch(len(examples), self._global_batch(job))  # fail early on a tiny dataset
        paths = match_target_modules(self.model, lora.target_modules)
        torch.manual_seed(cfg.seed)  # as LoraFinetuneRecipe.setup: same A, in the same order
        for path in paths:
            layer = packed_layer(self.model, path, self.layout)
            lora_layer = LoraLinear(layer.base_layer, r=lora.r, scaling=lora.scaling,
                                    dropout=lora.dropout, init=lora.init)  # fmt: skip
            layer.jobs[key] = lora_layer
            job.modules[path] = lora_layer
            job.params += [lora_layer.lora_A.weight, lora_layer.lora_B.weight]
        for p in job.params:
            p.requires_grad_(True)
        job.optimizer = torch.optim.AdamW(job.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.jobs[key] = job
        return job

    def remove(self, key: str) -> PackedJob:
        """Leave the pack (finished, failed or cancelled); the others go on unchanged."""
        job = self.jobs.pop(key)
        for path in job.modules:
            layer = self.model.get_submodule(path)
            if isinstance(layer, PackedLoraLinear):
                layer.jobs.pop(key, None)
        return job

    # -- one step of every job ---------------------------------------------------------------
    def _global_batch(self, job: PackedJob) -> int:
        return job.cfg.batch_size * self.world * job.cfg.grad_accum

    def step(self, failed: dict[str, str] | None = None) -> dict[str, StepReport]:
        """One optimizer step of every unfinished job, sharing each micro-step's forward.

        Args:
            failed: when given, a job whose loss is not finite takes no step and is recorded
                here (key → reason) while the others step on; otherwise that raises.

        Raises:
            TrainingError: a loss that is not finite (without ``failed``).
        """
        active = [j for j in self.jobs.values() if not j.done]
        if not active:
            return {}
        t0 = time.perf_counter()
        self.model.train()
        plans, denoms, lrs = {}, {}, {}
        for job in active:
            indices = global_batch_indices(job.step, n_examples=len(job.examples),
                                           global_batch=self._global_batch(job),
                                           seed=job.cfg.seed)  # fmt: skip
            denoms[job.key] = sum(n_loss_tokens(job.examples[i]) for i in indices)
            c = job.cfg
            lrs[job.key] = lr_at(job.step, peak=c.lr, warmup=c.warmup_steps, total=c.max_steps,
                                 min_ratio=c.min_lr_ratio)  # fmt: skip
            plans[job.key] = rank_micro_batches(indices, world=self.world, rank=self.rank,
                                                accum=job.cfg.grad_accum)  # fmt: skip
            assert job.optimizer is not None
            for group in job.optimizer.param_groups:
                group["lr"] = lrs[job.key]
            job.optimizer.zero_grad(set_to_none=False)
        # the shared dropout stream: a pure function of the pack's steps (see module docs)
        first = active[0]
        torch.manual_seed(first.cfg.seed * 1_000_003 + first.step * 1_009 + self.rank)
        loss_totals = {j.key: torch.zeros((), dtype=torch.float64) for j in active}
        tokens = {j.key: 0 for j in active}
        for m in range(active[0].cfg.grad_accum):
            rows: list[Example] = []
            groups: list[tuple[int, int]] = []
            self.layout.segments = []
            for job in active:
                mine = [job.examples[i] for i in plans[job.key][m]]
                groups.append((len(rows), len(rows) + len(mine)))
                self.layout.segments.append((job.key, len(rows), len(rows) + len(mine)))
                rows += mine
            batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
            sums = causal_lm_loss_sums(self.model, batch, groups)
            total = sum(s / denoms[j.key] for s, j in zip(sums, active, strict=True))
            total.backward()  # type: ignore[union-attr]
            for (start, stop), s, job in zip(groups, sums, active, strict=True):
                loss_totals[job.key] += s.detach().double().cpu()
                tokens[job.key] += int(batch["attention_mask"][start:stop].sum())
        self.layout.segments = []
        # one all-reduce for every job's gradients and statistics
        grads = [p.grad for j in active for p in j.params if p.grad is not None]
        stats = torch.tensor([[float(loss_totals[j.key]), float(tokens[j.key])] for j in active],
                             dtype=torch.float64)  # fmt: skip
        self.all_reduce([*grads, stats])
        elapsed = time.perf_counter() - t0
        reports = {}
        for k, job in enumerate(active):
            loss = float(stats[k, 0]) / denoms[job.key]
            if not math.isfinite(loss):
                reason = f"loss is not finite at step {job.step} ({loss}); lower lr"
                if failed is None:
                    raise TrainingError(f"job {job.key}: {reason}")
                failed[job.key] = reason  # the same on every rank: the loss was all-reduced
                continue
            norm = float(torch.nn.utils.clip_grad_norm_(job.params, job.cfg.max_grad_norm))
            assert job.optimizer is not None
            job.optimizer.step()
            job.step += 1
            n = int(stats[k, 1])
            reports[job.key] = StepReport(step=job.step, loss=loss, lr=lrs[job.key],
                                          grad_norm=norm, tokens=n,
                                          tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
                                          elapsed_s=elapsed)  # fmt: skip
        return reports

    @torch.no_grad()
    def evaluate(self, key: str, examples: Sequence[Example], *, batch_size: int = 32) -> float:
        """Mean per-token loss of job ``key`` over ``examples`` (this worker's share)."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        mine = list(examples)[self.rank :: self.world]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            self.layout.segments = [(key, 0, len(chunk))]
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
            total[0] += float(causal_lm_loss_sums(self.model, batch, [(0, len(chunk))])[0])
            total[1] += sum(n_loss_tokens(e) for e in chunk)
        self.layout.segments = []
        self.all_reduce([total])
        self.model.train(was_training)
        return float(total[0] / total[1]) if total[1] else float("nan")

    def save(
        self, key: str, out_dir: str | Path, *, base_model_name_or_path: str | None = None
    ) -> Path:
        """Write job ``key``'s adapter in PEFT's format (as a solo run writes it)."""
        job = self.jobs[key]
        return save_adapter_state(job.state_dict(), job.lora, out_dir,
                                  base_model_name_or_path=base_model_name_or_path)  # fmt: skip

    def run(self, *, on_report: Callable[[str, StepReport], None] | None = None) -> None:
        """Step until every job has finished."""
        while any(not j.done for j in self.jobs.values()):
            for key, report in self.step().items():
                if on_report is not None:
                    on_report(key, report)
