"""Spectrum and rank reduction of LoRA updates: against dense SVDs, and through PEFT."""

from __future__ import annotations

import math

import pytest
import torch

from workers.lora import LoraConfig
from workers.lora.errors import LoraConfigError
from workers.lora.spectrum import (
    adapter_spectrum,
    compress,
    energy_rank,
    singular_values,
    truncate,
)


def _pair(out: int, inp: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_singular_values_are_those_of_the_dense_update():
    a, b = _pair(48, 32, 8)
    dense = torch.linalg.svdvals(2.0 * b.double() @ a.double())
    assert torch.allclose(singular_values(a, b, 2.0), dense[:8], rtol=1e-9, atol=1e-9)


def test_a_rank_deficient_update_shows_its_true_rank():
    a, b = _pair(40, 30, 8)
    a[3:] = 0  # only 3 of 8 directions used
    sigma = singular_values(a, b, 1.0)
    assert (sigma[3:] < 1e-9).all() and (sigma[:3] > 1e-3).all()
    assert energy_rank(sigma, 0.99) <= 3 and energy_rank(sigma, 1.0) == 3


def test_energy_rank_counts_the_squared_singular_values():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(sigma, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [
        1, 1, 2, 2, 3, 3]  # fmt: skip
    assert energy_rank(torch.zeros(4), 0.9) == 0
    with pytest.raises(LoraConfigError):
        energy_rank(sigma, 0.0)


def test_truncation_is_the_eckart_young_optimum():
    a, b = _pair(64, 40, 16, seed=3)
    scaling = 0.5
    dense = scaling * b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (1, 4, 15):
        a2, b2 = truncate(a.double(), b.double(), scaling, k)
        assert a2.shape == (k, 40) and b2.shape == (64, k)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(b2 @ a2, best, atol=1e-9)
        # the error is exactly the discarded energy
        assert math.isclose(float(torch.linalg.norm(dense - b2 @ a2)),
                            float(s[k:].pow(2).sum().sqrt()), rel_tol=1e-9)  # fmt: skip
    a2, b2 = truncate(a.double(), b.double(), scaling, 20)  # above r: exact, zero-padded
    assert torch.allclose(b2 @ a2, dense, atol=1e-9) and a2.shape == (20, 40)


SIGMA = [10, 5, 1, 0.5, 0.1, 0.1, 0.05, 0.01]  # energy kept: 79.2 %, 98.99 %, 99.78 % …


def _adapter() -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Two layers whose B·A has the singular values SIGMA (hand-placed: B = Q·diag(σ), A = Pᵀ)."""
    cfg = LoraConfig(r=8, alpha=8, target_modules=("q_proj", "v_proj"))  # scaling 1
    weights = {}
    layers = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    for i, name in enumerate(layers):
        g = torch.Generator().manual_seed(10 + i)
        q, _ = torch.linalg.qr(torch.randn(32, 8, generator=g))
        p, _ = torch.linalg.qr(torch.randn(32, 8, generator=g))
        weights[f"base_model.model.{name}.lora_A.weight"] = p.T.contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = q * torch.tensor(SIGMA)
    return weights, cfg


def test_adapter_spectrum_and_compression_by_energy_or_rank():
    weights, cfg = _adapter()
    spec = adapter_spectrum(weights, cfg)
    assert [x.module for x in spec.layers] == ["model.layers.0.self_attn.q_proj",
                                               "model.layers.0.self_attn.v_proj"]  # fmt: skip
    assert spec.layers[0].singular_values == pytest.approx(SIGMA, rel=1e-5)
    assert (spec.rank_90, spec.rank_99, spec.summary()["r"]) == (2, 3, 8)
    c = compress(weights, cfg, energy=0.99)
    assert c.rank == 3 and c.energy_kept_min == pytest.approx(126 / 126.2726, rel=1e-5)
    assert c.config.r == c.rank and c.config.scaling == 1.0
    assert c.size_ratio == pytest.approx(c.rank / 8)
    two = compress(weights, cfg, rank=2)
    assert two.rank == 2 and two.energy_kept_min == pytest.approx(125 / 126.2726, rel=1e-5)
    for bad in ({}, {"rank": 2, "energy": 0.9}, {"rank": 8}):
        with pytest.raises(LoraConfigError):
            compress(weights, cfg, **bad)  # type: ignore[arg-type]
