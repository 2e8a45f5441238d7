"""The spectrum of a LoRA update, and its best lower-rank approximation.

A layer's update is ΔW = s·B·A (out × in, rank ≤ r; s the scaling). Its singular values
σ₁ ≥ … ≥ σ_r say how many directions the update really uses: most trained adapters put nearly
all of their energy Σσᵢ² in a few of their r directions. The spectrum is computed without
forming ΔW: with thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A,

    ΔW = Q_B · (s · R_B R_Aᵀ) · Q_Aᵀ,

and the r × r core M = s·R_B R_Aᵀ has ΔW's singular values (Q_B, Q_A have orthonormal
columns). With M = U Σ Vᵀ, the best rank-k approximation of ΔW in the Frobenius and spectral
norms (Eckart–Young–Mirsky) is Q_B U_k Σ_k V_kᵀ Q_Aᵀ, stored as a rank-k LoRA pair

    B′ = Q_B U_k √Σ_k   (out × k),    A′ = √Σ_k V_kᵀ Q_Aᵀ   (k × in),   scaling 1 (alpha = k),

so B′A′ is that approximation exactly, and a PEFT-format adapter of rank k holds it. All in
float64 on the CPU: a few r × r problems per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workers.lora.config import LoraConfig
from workers.lora.errors import LoraConfigError
from workers.lora.inject import PEFT_PREFIX

ENERGIES = (0.9, 0.99)


def _core(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    """Q_B, the core M = s·R_B R_Aᵀ, Q_A for A (r × in), B (out × r)."""
    qb, rb = torch.linalg.qr(b.detach().to(torch.float64, copy=True).cpu())  # out×r, r×r
    qa, ra = torch.linalg.qr(a.detach().to(torch.float64, copy=True).cpu().T)  # in×r, r×r
    return qb, scaling * (rb @ ra.T), qa


def singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """σ of s·B·A, descending (length r; float64)."""
    _, core, _ = _core(a, b, scaling)
    return torch.linalg.svdvals(core)


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """The smallest k whose σ₁…σ_k hold at least ``energy`` of Σσ² (0 for a zero update)."""
    if not 0.0 < energy <= 1.0:
        raise LoraConfigError("energy", f"must be in (0, 1], got {energy!r}")
    power = sigma.to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # a tiny tolerance: 1.0 must be reachable through rounding of the cumulative sum
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def truncate(
    a: torch.Tensor, b: torch.Tensor, scaling: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) of rank ``k`` with B′A′ the best rank-k approximation of s·B·A (scaling 1).

    ``k`` above the layer's rank pads with zero directions (the product is then exact).
    """
    if k < 1:
        raise LoraConfigError("rank", f"must be ≥ 1, got {k}")
    qb, core, qa = _core(a, b, scaling)
    u, s, vh = torch.linalg.svd(core)
    r = s.shape[0]
    keep = min(k, r)
    root = s[:keep].sqrt()
    b_new = torch.zeros(qb.shape[0], k, dtype=torch.float64)
    a_new = torch.zeros(k, qa.shape[0], dtype=torch.float64)
    b_new[:, :keep] = qb @ u[:, :keep] * root
    a_new[:keep] = root[:, None] * (vh[:keep] @ qa.T)
    return a_new.to(a.dtype), b_new.to(b.dtype)


@dataclass(frozen=True)
class LayerSpectrum:
    """One adapted layer: its singular values and the ranks that keep 90 % / 99 % energy."""

    module: str
    r: int
    singular_values: list[float]
    rank_90: int
    rank_99: int

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "r": self.r, "singular_values": self.singular_values,
                "rank_90": self.rank_90, "rank_99": self.rank_99}  # fmt: skip


@dataclass(frozen=True)
class Spectrum:
    """Every adapted layer's spectrum, and the adapter-wide ranks (the max over layers)."""

    layers: list[LayerSpectrum] = field(default_factory=list)

    @property
    def rank_90(self) -> int:
        return max((x.rank_90 for x in self.layers), default=0)

    @property
    def rank_99(self) -> int:
        return max((x.rank_99 for x in self.layers), default=0)

    def summary(self) -> dict[str, Any]:
        """What the catalog stores with a version (``metrics["spectrum"]``)."""
        return {"r": max((x.r for x in self.layers), default=0), "rank_90": self.rank_90,
                "rank_99": self.rank_99, "layers": [x.as_dict() for x in self.layers]}  # fmt: skip


def pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module path → (A, B)`` from PEFT-keyed weights (``….lora_A.weight`` / ``lora_B``)."""
    from workers.lora.io import parse_adapter_keys

    out = {}
    for path, ab in parse_adapter_keys(weights).items():  # AdaLoRA: Λ folded into A
        out[path] = (ab["A"] * ab["E"] if "E" in ab else ab["A"], ab["B"])
    return out


def _plain_lora(config: LoraConfig) -> None:
    if config.method != "lora":  # DoRA: a truncated direction changes every row norm
        raise LoraConfigError("method", f"compressing a {config.method} adapter is not "
                              "supported (plain LoRA only)")  # fmt: skip


def adapter_spectrum(weights: dict[str, torch.Tensor], config: LoraConfig) -> Spectrum:
    """The spectrum of every layer of an adapter (PEFT keys, its config's scaling)."""
    layers = []
    for module, (a, b) in sorted(pairs(weights).items()):
        sigma = singular_values(a, b, config.scaling)
        layers.append(LayerSpectrum(
            module, int(a.shape[0]), [float(x) for x in sigma],
            energy_rank(sigma, ENERGIES[0]), energy_rank(sigma, ENERGIES[1])))  # fmt: skip
    return Spectrum(layers)


@dataclass(frozen=True)
class Compressed:
    """A compressed adapter: weights and config, and what it kept."""

    weights: dict[str, torch.Tensor]
    config: LoraConfig
    rank: int
    energy_kept_min: float  # the least energy any layer kept
    bytes_before: int
    bytes_after: int

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before


def compress(
    weights: dict[str, torch.Tensor],
    config: LoraConfig,
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> Compressed:
    """Every layer truncated to one rank: ``rank``, or the least rank that keeps ``energy`` in
    every layer (one rank for all layers keeps the adapter a plain PEFT LoRA, no rank_pattern).

    Raises:
        LoraConfigError: neither or both of ``rank`` / ``energy``, or a rank not below r.
    """
    if (rank is None) == (energy is None):
        raise LoraConfigError("rank", "give a rank or an energy to keep (one of the two)")
    _plain_lora(config)
    layers = pairs(weights)
    spectra = {m: singular_values(a, b, config.scaling) for m, (a, b) in layers.items()}
    if rank is None:
        assert energy is not None
        rank = max(1, max(energy_rank(s, energy) for s in spectra.values()))
    if rank >= config.r:
        raise LoraConfigError("rank", f"must be below the adapter's r = {config.r}, got {rank}")
    out: dict[str, torch.Tensor] = {}
    kept = 1.0
    for module, (a, b) in layers.items():
        a2, b2 = truncate(a, b, config.scaling, rank)
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a2.contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b2.contiguous()
        power = spectra[module] ** 2
        if float(power.sum()) > 0:
            kept = min(kept, float(power[:rank].sum() / power.sum()))
    new_config = LoraConfig(r=rank, alpha=float(rank), dropout=config.dropout,
                            target_modules=config.target_modules, use_rslora=False,
                            init=config.init)  # fmt: skip
    before = sum(t.numel() * t.element_size() for t in weights.values())
    after = sum(t.numel() * t.element_size() for t in out.values())
    return Compressed(out, new_config, rank, kept, before, after)
