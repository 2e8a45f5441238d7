"""LoRA arithmetic: what an adapter costs for a given base, without loading any weights.

For a linear layer of shape (out × in), LoRA of rank r trains r·(in + out) parameters instead
of in·out. AdamW keeps two fp32 moments per trainable parameter (8 bytes), so the optimizer
state shrinks by the same factor as the parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class ModuleCost:
    """One adapted linear layer."""

    name: str
    in_features: int
    out_features: int
    lora_params: int

    @property
    def full_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def reduction(self) -> float:
        """How many times fewer trainable parameters than training the layer itself."""
        return self.full_params / self.lora_params


@dataclass(frozen=True)
class LoraReport:
    """Totals over every adapted module."""

    r: int
    modules: tuple[ModuleCost, ...]
    base_params: int

    @property
    def trainable_params(self) -> int:
        return sum(m.lora_params for m in self.modules)

    @property
    def fraction_of_base(self) -> float:
        return self.trainable_params / self.base_params

    def adapter_bytes(self, bytes_per_param: int) -> int:
        return self.trainable_params * bytes_per_param

    @property
    def optimizer_bytes_full(self) -> int:
        """AdamW state for full fine-tuning of every base parameter."""
        return self.base_params * ADAMW_STATE_BYTES

    @property
    def optimizer_bytes_lora(self) -> int:
        return self.trainable_params * ADAMW_STATE_BYTES

    @property
    def optimizer_bytes_saved(self) -> int:
        return self.optimizer_bytes_full - self.optimizer_bytes_lora


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """r·(in + out): A is (r × in), B is (out × r)."""
    return r * (in_features + out_features)


def lora_report(model: nn.Module, module_paths: list[str], r: int) -> LoraReport:
    """Cost of rank-``r`` LoRA on ``module_paths`` of ``model`` (meta-device models work)."""
    modules = []
    for path in module_paths:
        layer = model.get_submodule(path)
        layer = getattr(layer, "base_layer", layer)
        assert isinstance(layer, nn.Linear)
        modules.append(
            ModuleCost(
                path,
                layer.in_features,
                layer.out_features,
                lora_params(layer.in_features, layer.out_features, r),
            )
        )
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return LoraReport(r=r, modules=tuple(modules), base_params=base)
