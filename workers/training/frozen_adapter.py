"""An adapter applied read-only over a model's base layers, beside whatever is trained there.

A reinforcement job's ``score_model`` grader may ask an adapter of the catalog. It runs on the
trainer's own resident base — no second copy of the base, no network call — as forward hooks
on the base linear layers it targets, each adding scaling · (x Aᵀ) Bᵀ, while the trained
adapters are switched off. Plain LoRA only (a DoRA or AdaLoRA grader is refused when loaded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.errors import TrainingError
from workers.lora.io import parse_adapter_keys, read_adapter_config, read_adapter_weights


@dataclass(frozen=True)
class FrozenAdapter:
    """An adapter's A, B and scaling per module path."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float

    @classmethod
    def from_dir(cls, adapter_dir: str | Path) -> FrozenAdapter:
        """Read a PEFT-format adapter (safetensors only).

        Raises:
            AdapterFormatError: unreadable files; TrainingError: not plain LoRA.
        """
        config = read_adapter_config(adapter_dir)
        if config.use_dora or config.adalora is not None:
            raise TrainingError(f"a grader model must be plain LoRA; {adapter_dir} is "
                                f"{config.method}")  # fmt: skip
        modules = parse_adapter_keys(read_adapter_weights(adapter_dir))
        return cls({p: (m["A"], m["B"]) for p, m in modules.items()}, config.scaling)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """For the duration, ``model``'s base layers at this adapter's paths add its update."""
        handles = []
        try:
            for path, (a, b) in self.layers.items():
                module = model.get_submodule(path)
                base = getattr(module, "base_layer", module)
                handles.append(base.register_forward_hook(self._hook(a, b)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, a: torch.Tensor, b: torch.Tensor) -> Any:
        scaling = self.scaling

        def add_update(_module: nn.Module, inputs: tuple[torch.Tensor, ...],
                       out: torch.Tensor) -> torch.Tensor:  # fmt: skip
            x = inputs[0]
            update = (x.to(a.dtype) @ a.t()) @ b.t()
            return out + (update * scaling).to(out.dtype)

        return add_update
