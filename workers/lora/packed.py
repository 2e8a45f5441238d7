"""Many jobs' LoRA adapters on one frozen base, trained in one batched forward.

A packed batch concatenates the rows of several jobs along the batch dimension; ``PackLayout``
says which contiguous rows belong to which job. Each adapted linear layer computes the base
GEMM once for all rows, then adds each job's low-rank update to that job's rows only, with
that job's own A, B and scaling. Jobs may differ in rank, alpha and target modules: a layer a
job does not target simply adds nothing to its rows. Because a job's rows are contiguous, no
gather is needed (serving, whose rows interleave freely, gathers per row instead).

Each job's A and B live in an ordinary ``LoraLinear`` over the same base layer (never a copy
of it), created exactly as a solo run creates them, so a packed job starts from the same
weights as the same job alone, and its adapter is saved in the same PEFT format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.lora.inject import _set_submodule
from workers.lora.layer import LoraLinear


@dataclass
class PackLayout:
    """Which rows of the current batch belong to which job: ``(job, start, stop)``."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)


class PackedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` shared by several jobs' LoRA updates.

    Args:
        base_layer: the frozen linear layer (shared, never copied).
        layout: the pack's row layout, shared by every packed layer of the model.
    """

    def __init__(self, base_layer: nn.Linear, layout: PackLayout) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        # job → its LoraLinear over base_layer; kept out of the module tree, so the model's
        # parameters and state dict stay the base's (each job owns and saves its own)
        self.jobs: dict[str, LoraLinear] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # one GEMM over every job's rows
        for job, start, stop in self.layout.segments:
            lora = self.jobs.get(job)
            if lora is None or lora.disabled:
                continue  # this job does not adapt this layer
            xs = x[start:stop]
            if lora.training and lora.dropout_p > 0:
                xs = F.dropout(xs, p=lora.dropout_p, training=True)
            a, b = lora.lora_A.weight, lora.lora_B.weight
            xa = (xs.to(a.dtype) @ a.t()).mul_(lora.scaling)  # scaling on the small activation
            out[start:stop] += (xa @ b.t()).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        base = self.base_layer
        return f"in={base.in_features}, out={base.out_features}, jobs={len(self.jobs)}"


def packed_layer(model: nn.Module, path: str, layout: PackLayout) -> PackedLoraLinear:
    """The packed layer at ``path``, wrapping the plain linear layer there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, PackedLoraLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"module {path!r} is {type(module).__name__}, not nn.Linear")
    for p in module.parameters():
        p.requires_grad_(False)
    wrapped = PackedLoraLinear(module, layout)
    _set_submodule(model, path, wrapped)
    return wrapped
