"""Many adapters in one forward pass: each row of a batch uses the adapter in its slot.

The Punica / S-LoRA idea in plain PyTorch. Every target linear layer holds ``S`` adapter
slots as rank-padded tensors — A: (S, r_max, in), B: (S, out, r_max) with the scale folded
in — and a batch carries one slot index per row. The layer gathers each row's A and B and
applies them with batched matmuls, so rows for different adapters (and rows for the bare
base, slot -1) share the base GEMM and one pass:

    y[b] = x[b] W0ᵀ + scaling[s_b] · (x[b] A[s_b]ᵀ) B[s_b]ᵀ,   s_b = slot of row b

Padding an adapter of rank r < r_max with zero rows of A and zero columns of B leaves its
product unchanged, so adapters of different ranks share one slot layout.

DoRA adapters share the batch too. At inference a DoRA layer is W = diag(c)·(W0 + s·B·A)
with c = m / ‖W0 + s·B·A‖ per output row — fixed once the adapter is loaded — so a slot also
holds c (ones for plain LoRA), and a batch with a DoRA row computes

    y[b] = c[s_b] ⊙ (x[b] W0ᵀ + s·(x[b] A[s_b]ᵀ) B[s_b]ᵀ) + bias,

which leaves every other row's answer unchanged (its c is 1). Batches without a DoRA row skip
the scaling altogether.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.lora.layer import LoraLinear

BASE_SLOT = -1  # a row that uses no adapter


class MultiLoraLinear(nn.Module):
    """A frozen linear layer with ``n_slots`` adapter slots applied per row.

    Each slot stores ``Aᵀ`` and ``(scaling · B)ᵀ`` — transposed, so a gathered slot feeds a
    batched matmul as it is, and with the scale folded in — and one extra slot, index
    ``n_slots``, stays zero: base rows gather it. A forward is then five tensor ops whatever
    the mix (two ``index_select`` gathers, two batched matmuls, an add), which matters when
    the layers are small and per-op overhead, not arithmetic, sets the step time.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dora_scale: torch.Tensor

    def __init__(self, base_layer: nn.Linear, *, n_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        dev, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.n_slots, self.max_rank = n_slots, max_rank
        shape_a = (n_slots + 1, base_layer.in_features, max_rank)  # Aᵀ per slot
        self.register_buffer("lora_A", torch.zeros(shape_a, device=dev, dtype=dtype))
        shape_b = (n_slots + 1, max_rank, base_layer.out_features)  # (scaling · B)ᵀ per slot
        self.register_buffer("lora_B", torch.zeros(shape_b, device=dev, dtype=dtype))
        # DoRA's per-row output scale c = m / ‖W0 + s·B·A‖ per slot; 1 for LoRA and the base
        shape_c = (n_slots + 1, base_layer.out_features)
        self.register_buffer("dora_scale", torch.ones(shape_c, device=dev, dtype=dtype))
        self.dora_slots: set[int] = set()
        self.slot_ids: torch.Tensor | None = None  # (batch,) gather index, set per forward
        self.scale_rows = False  # the next forward has a DoRA row (set with slot_ids)

    @torch.no_grad()
    def load_slot(
        self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float,
        magnitude: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Put one adapter (A: r × in, B: out × r) into ``slot``, zero-padded to max_rank; a
        DoRA adapter also brings its magnitude m (out,), turned into c = m / ‖W0 + s·B·A‖."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not one of 0…{self.n_slots - 1}")
        r = a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"adapter rank {r} exceeds the slots' max rank {self.max_rank}")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :, :r] = a.t().to(self.lora_A.dtype)
        self.lora_B[slot, :r] = (b * scaling).t().to(self.lora_B.dtype)
        self.dora_scale[slot].fill_(1.0)
        self.dora_slots.discard(slot)
        if magnitude is not None:
            w = self.base_layer.weight.to(torch.float32)
            delta = scaling * (b.to(torch.float32) @ a.to(torch.float32))
            norm = torch.linalg.vector_norm(w + delta, dim=1)
            self.dora_scale[slot] = (magnitude.to(torch.float32) / norm).to(self.dora_scale.dtype)
            self.dora_slots.add(slot)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.dora_scale[slot].fill_(1.0)
        self.dora_slots.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out): the shared base GEMM
        idx = self.slot_ids
        if idx is None:
            return out
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        # index_select, not lora_A[idx]: the same gather, several times faster on a CPU
        xa = torch.bmm(x3, torch.index_select(self.lora_A, 0, idx))  # (B, T, r); base rows: 0
        update = torch.bmm(xa, torch.index_select(self.lora_B, 0, idx))  # (B, T, out)
        out = out + update.reshape(out.shape)
        if not self.scale_rows:
            return out
        scale = torch.index_select(self.dora_scale, 0, idx)  # (B, out)
        scale = scale.reshape(scale.shape[0], *([1] * (out.dim() - 2)), scale.shape[-1])
        bias = self.base_layer.bias
        if bias is None:
            return out * scale
        return (out - bias) * scale + bias  # DoRA scales W·x, not the bias


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
    """Tell every layer which slot each row of the next forward passes uses (``BASE_SLOT``:
    none). A batch of base rows only skips the LoRA work altogether."""
    index = None
    present: set[int] = set()
    if slot_ids is not None and layers and bool((slot_ids >= 0).any()):
        zero_slot = next(iter(layers.values())).n_slots
        index = torch.where(slot_ids >= 0, slot_ids, torch.full_like(slot_ids, zero_slot))
        if any(layer.dora_slots for layer in layers.values()):
            present = set(index.unique().tolist())
    for layer in layers.values():
        layer.slot_ids = index
        layer.scale_rows = bool(present & layer.dora_slots)
