"""The LoRA layer's math: starts at the base, merges exactly, trains only A and B."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from workers.lora import (
    LoraConfig,
    LoraLinear,
    MergeError,
    inject_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)


def _logits(model, batch):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**batch).logits


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_zero_b_gives_identical_logits(base, batch):
    model, _ = base
    before = _logits(model, batch)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    after = _logits(model, batch)
    assert torch.equal(before, after)


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_init_a_random_b_zero(init):
    layer = LoraLinear(nn.Linear(64, 32), r=8, scaling=2.0, init=init)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.std() > 0
    if init == "gaussian":  # PEFT's "gaussian": std 1/r
        assert layer.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_merged_equals_unmerged_and_unmerge_restores(base, batch):
    model, _ = base
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    _randomize_b(model)
    unmerged = _logits(model, batch)
    assert merge_lora(model) == 4
    merged = _logits(model, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert unmerge_lora(model) == 4
    restored = {
        n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n
    }
    for name, w0 in originals.items():
        torch.testing.assert_close(restored[name], w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=0)


def test_merge_refuses_non_finite_and_leaves_base_untouched():
    layer = LoraLinear(nn.Linear(8, 8), r=2, scaling=1.0)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0)
    with pytest.raises(MergeError):
        layer.unmerge()


@pytest.mark.parametrize(
    ("targets", "expected"),
    [(("q_proj", "v_proj"), 4), ("all-linear", 14), (r".*\.mlp\.(up|down)_proj", 4)],
)
def test_parameter_count_is_r_times_in_plus_out(base, targets, expected):
    model, _ = base
    r = 4
    inject_lora(model, LoraConfig(r=r, target_modules=targets))
    layers = lora_modules(model)
    assert len(layers) == expected
    for layer in layers.values():
        n = layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
        assert n == r * (layer.in_features + layer.out_features)
    assert "lm_head" not in " ".join(layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(model))


def test_only_lora_receives_gradients_and_base_unchanged(base, batch):
    model, _ = base
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        for n, p in model.named_parameters():
            if "lora_" in n:
                assert p.grad is not None
            else:
                assert p.grad is None, n
        opt.step()
        opt.zero_grad()
    after = {
        n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n
    }
    for name, p in before.items():
        assert torch.equal(after[name], p), name
    assert any(torch.count_nonzero(m.lora_B.weight) for m in lora_modules(model).values())


def test_rslora_scale():
    plain = LoraConfig(r=16, alpha=32)
    rs = LoraConfig(r=16, alpha=32, use_rslora=True)
    assert plain.scaling == 2.0
    assert rs.scaling == pytest.approx(32 / math.sqrt(16))
    layer = LoraLinear(nn.Linear(16, 16), r=16, scaling=rs.scaling)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = layer.lora_B.weight @ layer.lora_A.weight * 8.0
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 32), r=4, scaling=1.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 32)
    layer.eval()
    no_dropout = layer.base_layer(x) + layer.lora_B(layer.lora_A(x))
    torch.testing.assert_close(layer(x), no_dropout)
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_function_matches_autograd_reference(dropout):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=torch.float64)
    layer = LoraLinear(base, r=3, scaling=0.7, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    y.backward(torch.ones_like(y))
    fused = (
        y.detach(),
        x.grad.clone(),
        layer.lora_A.weight.grad.clone(),
        layer.lora_B.weight.grad.clone(),
    )
    x.grad = None
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    torch.manual_seed(5)
    xl = torch.nn.functional.dropout(x, p=dropout, training=True) if dropout else None
    y_ref = layer._forward_unfused(x, xl)
    y_ref.backward(torch.ones_like(y_ref))
    ref = (y_ref.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_fused():
    from workers.lora.layer import _LoraLinearFn

    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: _LoraLinearFn.apply(x, None, w, None, a, b, 1.5), (x, a, b)
    )


def test_works_on_read_only_shared_base(tmp_path):
    """W0 may be a read-only memory map shared by several workers: never written, never copied."""
    path = tmp_path / "w.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((16, 8)).astype(np.float32))
    mapped = np.load(path, mmap_mode="r")
    with pytest.warns(UserWarning, match="not writable"):
        w0 = torch.from_numpy(mapped)
    base = nn.Linear(8, 16, bias=False)
    base.weight = nn.Parameter(w0, requires_grad=False)
    layer = LoraLinear(base, r=2, scaling=1.0)
    assert layer.base_layer.weight.data_ptr() == w0.data_ptr()  # not copied
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_B.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    with pytest.raises(MergeError, match="cannot merge"):
        layer.merge()
    assert np.array_equal(np.load(path), mapped)
