"""Packed training: several LoRA fine-tuning jobs on one frozen base, one forward per micro-step.

The training core (``workers.training.core``) steps every member of a trainer together; this
module only makes the members of a pack: each job's LoRA layers live beside the others' in
``PackedLoraLinear`` layers that compute the base GEMM once for every row and add each job's
update to its own rows (``PackLayout``, set by the core's ``route`` before each forward).

Each job keeps everything a solo run has — its own LoRA config (rank, alpha, targets),
objective, data order (seed), learning-rate schedule, AdamW state, gradient clipping by its own
norm, step count and adapter — and shares only the base and its GEMMs; since no two jobs share
a trainable parameter, each job's gradient is exactly its solo gradient.

Jobs join and leave at step boundaries (``add``/``remove``): a joiner is initialised exactly
as a solo run of it would be (same seed, same creation order), so its curve is its solo curve,
and the others' curves do not change when it comes or goes.

Packing rules: the same base and the same ``grad_accum`` (micro-steps are shared: the
trainer's ``add`` checks it), and plain LoRA (``packed_variant_error``): the packed layer has
no DoRA magnitude or AdaLoRA diagonal and shares one full-precision base, so such a job is
refused here (the scheduler trains it alone). With LoRA dropout > 0 a packed job draws its
dropout masks from the shared stream, so its curve is equal to its solo run in distribution,
not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.errors import TrainingError
from workers.lora import LoraConfig
from workers.lora.inject import match_target_modules
from workers.lora.io import save_adapter_state
from workers.lora.layer import LoraLinear
from workers.lora.packed import PackedLoraLinear, PackLayout, packed_layer
from workers.training.checkpoint import adapter_state
from workers.training.core import AllReduce, Member, Segments, Trainer
from workers.training.objectives import Objective, Supervised
from workers.training.settings import StepReport, TrainConfig


def packed_variant_error(lora: LoraConfig) -> str | None:
    """Why a job with this LoRA config cannot train packed, or None when it can."""
    if lora.use_dora:
        return "DoRA trains alone (the packed layer has no magnitude vector)"
    if lora.adalora is not None:
        return "AdaLoRA trains alone (the packed layer has no SVD diagonal)"
    if lora.base_quantization != "none":
        return "a quantized base trains alone (a pack shares one full-precision base)"
    return None


class PackedRecipe:
    """Train several jobs' adapters on one frozen ``model`` together.

    Args:
        model: the base causal LM (frozen in place; packed layers are wrapped in as jobs join).
        pad_id: padding token id.
        world, rank, all_reduce, device, tokenizer: as ``LoraFinetuneRecipe``.
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
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.layout = PackLayout()
        self.trainer = Trainer(model, pad_id=pad_id, route=self._route, detach=self._detach,
                               world=world, rank=rank, all_reduce=all_reduce,
                               device=device, tokenizer=tokenizer)  # fmt: skip
        for p in model.parameters():
            p.requires_grad_(False)

    def _route(self, segments: Segments) -> None:
        self.layout.segments = segments

    def _detach(self, member: Member) -> None:
        self.detach(member.key, member.modules)

    @property
    def jobs(self) -> dict[str, Member]:
        return self.trainer.members

    # -- membership (at step boundaries) ------------------------------------------------------
    def add(
        self,
        key: str,
        lora: LoraConfig,
        cfg: TrainConfig,
        items: Sequence[Any],
        *,
        objective: Objective | None = None,
        eval_items: Sequence[Any] = (),
        checkpoint_every: int = 0,
    ) -> Member:
        """Join the pack: LoRA layers created exactly as a solo run creates them.

        Raises:
            TrainingError: a duplicate key, a LoRA variant that trains alone, a job that
                cannot share micro-steps with the pack, or a dataset smaller than one global
                batch.
        """
        why = packed_variant_error(lora)
        if why is not None:
            raise TrainingError(f"job {key} cannot train packed: {why}")
        if key in self.jobs:
            raise TrainingError(f"job {key} is already in the pack")
        modules, params = self.attach(key, lora, seed=cfg.seed)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        member = Member(key, cfg, objective or Supervised(), items, modules, params, optimizer,
                        eval_items=eval_items, checkpoint_every=checkpoint_every,
                        lora=lora)  # fmt: skip
        try:
            return self.trainer.add(member)
        except TrainingError:
            self._detach(member)
            raise

    def attach(
        self, key: str, lora: LoraConfig, *, seed: int, trainable: bool = True
    ) -> tuple[dict[str, LoraLinear], list[torch.Tensor]]:
        """Create ``key``'s LoRA layers beside the others' exactly as a solo run creates them
        (seeded, in model order); returns them and their parameters (trainable or frozen)."""
        paths = match_target_modules(self.model, lora.target_modules)
        torch.manual_seed(seed)  # as LoraFinetuneRecipe.setup: same A, in the same order
        modules: dict[str, LoraLinear] = {}
        params: list[torch.Tensor] = []
        for path in paths:
            layer = packed_layer(self.model, path, self.layout)
            lora_layer = LoraLinear(layer.base_layer, r=lora.r, scaling=lora.scaling,
                                    dropout=lora.dropout, init=lora.init)  # fmt: skip
            layer.jobs[key] = lora_layer
            modules[path] = lora_layer
            params += [lora_layer.lora_A.weight, lora_layer.lora_B.weight]
        for p in params:
            p.requires_grad_(trainable)
        return modules, params

    def detach(self, key: str, modules: dict[str, LoraLinear]) -> None:
        """Drop ``key``'s layers (one that never joined the trainer: a frozen snapshot)."""
        for path in modules:
            layer = self.model.get_submodule(path)
            if isinstance(layer, PackedLoraLinear):
                layer.jobs.pop(key, None)

    def remove(self, key: str) -> Member:
        """Leave the pack (finished, failed or cancelled); the others go on unchanged."""
        return self.trainer.remove(key)

    # -- the core --------------------------------------------------------------------------
    def step(self, failed: dict[str, str] | None = None) -> dict[str, StepReport]:
        """One optimizer step of every unfinished job, sharing each micro-step's forward
        (``Trainer.step``)."""
        return self.trainer.step(failed)

    def evaluate(self, key: str, items: Sequence[Any], *, batch_size: int = 32) -> float:
        """Mean loss of job ``key`` over ``items`` (this worker's share)."""
        return self.trainer.evaluate(key, items, batch_size=batch_size).loss

    def save(
        self, key: str, out_dir: str | Path, *, base_model_name_or_path: str | None = None
    ) -> Path:
        """Write job ``key``'s adapter in PEFT's format (as a solo run writes it)."""
        job = self.jobs[key]
        assert job.lora is not None
        return save_adapter_state(adapter_state(job.modules), job.lora, out_dir,
                                  base_model_name_or_path=base_model_name_or_path)  # fmt: skip

    def run(self, *, on_report: Callable[[str, StepReport], None] | None = None) -> None:
        """Step until every job has finished (each stays in ``jobs`` for ``save``)."""
        while any(not j.done for j in self.jobs.values()):
            for key, report in self.trainer.step().items():
                if on_report is not None:
                    on_report(key, report)
