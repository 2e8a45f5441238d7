"""Many adapters in one forward pass: each row of a batch uses the adapter in its slot.

The Punica / S-LoRA idea in plain PyTorch. Every target linear layer holds ``S`` adapter
slots as rank-padded tensors — A: (S, r_max, in), B: (S, out, r_max), scaling: (S,) — and a
batch carries one slot index per row. The layer gathers each row's A and B and applies them
with batched matmuls, so rows for different adapters (and rows for the bare base, slot -1)
share the base GEMM and one pass:

    y[b] = x[b] W0ᵀ + scaling[s_b] · (x[b] A[s_b]ᵀ) B[s_b]ᵀ,   s_b = slot of row b

Padding an adapter of rank r < r_max with zero rows of A and zero columns of B leaves its
product unchanged, so adapters of different ranks share one slot layout.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.lora.layer import LoraLinear

BASE_SLOT = -1  # a row that uses no adapter


class MultiLoraLinear(nn.Module):
    """A frozen linear layer with ``n_slots`` adapter slots applied per row."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor

    def __init__(self, base_layer: nn.Linear, *, n_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        dev, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.n_slots, self.max_rank = n_slots, max_rank
        shape_a = (n_slots, max_rank, base_layer.in_features)
        self.register_buffer("lora_A", torch.zeros(shape_a, device=dev, dtype=dtype))
        shape_b = (n_slots, base_layer.out_features, max_rank)
        self.register_buffer("lora_B", torch.zeros(shape_b, device=dev, dtype=dtype))
        self.register_buffer("scaling", torch.zeros(n_slots, device=dev, dtype=dtype))
        self.slot_ids: torch.Tensor | None = None  # (batch,), set per forward by the server

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put one adapter (A: r × in, B: out × r) into ``slot``, zero-padded to max_rank."""
        r = a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"adapter rank {r} exceeds the slots' max rank {self.max_rank}")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)
        self.lora_B[slot, :, :r] = b.to(self.lora_B.dtype)
        self.scaling[slot] = scaling

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scaling[slot] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out): the shared base GEMM
        if self.slot_ids is None:
            return out
        slots = self.slot_ids
        active = slots >= 0
        if not bool(active.any()):
            return out
        idx = slots.clamp(min=0)
        a = self.lora_A[idx]  # (B, r, in)
        b = self.lora_B[idx]  # (B, out, r)
        scale = (self.scaling[idx] * active.to(self.scaling.dtype)).view(-1, 1, 1)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        xa = torch.bmm(x3, a.transpose(1, 2)) * scale  # (B, T, r); base rows scaled to 0
        update = torch.bmm(xa, b.transpose(1, 2))  # (B, T, out)
        return out + update.reshape(out.shape)


def to_multi_lora(model: nn.Module, paths: list[str], *, n_slots: int, max_rank: int) -> dict:
    """Replace the linear layers at ``paths`` with ``MultiLoraLinear``; returns them by path."""
    layers: dict[str, MultiLoraLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, child)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path} is not a linear layer")
        layer = MultiLoraLinear(base, n_slots=n_slots, max_rank=max_rank)
        setattr(parent, child, layer)
        layers[path] = layer
    return layers


def set_batch_slots(layers: dict[str, MultiLoraLinear], slot_ids: torch.Tensor | None) -> None:
    """Tell every layer which slot each row of the next forward passes uses."""
    for layer in layers.values():
        layer.slot_ids = slot_ids
