"""DoRA against PEFT (the oracle): files both ways with equal logits, training gradients and
merging; the magnitude starts at ‖W0‖ so a fresh DoRA layer is the base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tests.peft_dora import peft_dora_adapter
from workers.base_model import load_base
from workers.lora import (
    AdapterFormatError,
    LoraConfig,
    inject_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

DORA = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"), use_dora=True)


def _logits(model, batch):  # type: ignore[no-untyped-def]
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model, seed=5):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
            m.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(m.out_features, generator=g))


def test_a_fresh_dora_layer_is_the_base(tiny_base_dir, batch):
    base, _ = load_base(tiny_base_dir)
    expected = _logits(base, batch)
    model, _ = load_base(tiny_base_dir)
    inject_lora(model, DORA)
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=0)
    n = sum(p.numel() for p in lora_parameters(model))
    layers = lora_modules(model).values()
    assert n == sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() + m.out_features
                    for m in layers)  # fmt: skip


def test_ours_loads_in_peft_with_equal_logits(tiny_base_dir, batch, tmp_path):
    ours, _ = load_base(tiny_base_dir)
    inject_lora(ours, DORA)
    _randomize(ours)
    save_adapter(ours, DORA, tmp_path / "dora")
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "dora")
    torch.testing.assert_close(_logits(peft_model, batch), _logits(ours, batch), atol=1e-5,
                               rtol=0)  # fmt: skip


def test_peft_dora_loads_in_ours_with_equal_logits(tiny_base_dir, batch, tmp_path):
    peft_model = peft_dora_adapter(tiny_base_dir, tmp_path / "peft-dora",
                                   ["q_proj", "v_proj", "o_proj"], seed=9, scale=0.2)  # fmt: skip
    expected = _logits(peft_model, batch)
    ours, _ = load_base(tiny_base_dir)
    assert load_adapter(ours, tmp_path / "peft-dora").use_dora
    torch.testing.assert_close(_logits(ours, batch), expected, atol=1e-5, rtol=0)
    # merged: one weight per layer, the same logits; unmerged: the base weights again
    base_q = ours.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merge_lora(ours)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=1e-4, rtol=0)
    unmerge_lora(ours)
    q = ours.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q, base_q, atol=1e-5, rtol=0)


def _name(peft_or_ours: str) -> str:  # PEFT: ….lora_magnitude_vector.default.weight
    name = peft_or_ours.replace("base_model.model.", "").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def test_training_gradients_equal_peft(tiny_base_dir, batch, tmp_path):
    """One backward pass: A, B and the magnitude get PEFT's gradients (norm detached)."""
    ours, _ = load_base(tiny_base_dir)
    inject_lora(ours, DORA)
    _randomize(ours)
    save_adapter(ours, DORA, tmp_path / "dora")
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "dora",
                                           is_trainable=True)  # fmt: skip
    grads = []
    for model in (ours, peft_model):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({_name(n): p.grad for n, p in model.named_parameters()
                      if p.grad is not None})  # fmt: skip
    ours_g, peft_g = grads
    assert set(ours_g) == set(peft_g) and any("magnitude" in k for k in ours_g)
    for name, g in ours_g.items():
        torch.testing.assert_close(g, peft_g[name], atol=1e-5, rtol=1e-4)


def test_a_dora_file_without_magnitudes_is_refused(tiny_base_dir, tmp_path):
    import json

    ours, _ = load_base(tiny_base_dir)
    inject_lora(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, LoraConfig(r=4, target_modules=("q_proj",)), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="lacks lora_magnitude_vector"):
        load_adapter(load_base(tiny_base_dir)[0], tmp_path / "ad")
