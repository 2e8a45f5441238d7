"""A merged export is a plain Hugging Face model with the adapter's outputs."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, lora_modules, merge_state_dict, save_adapter
from workers.merged_export import export_merged


def test_export_has_no_lora_and_equal_logits(tiny_base_dir, batch, tmp_path):
    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4, target_modules="all-linear")
    inject_lora(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, cfg, tmp_path / "ad")
    with torch.no_grad():
        expected = model(**batch).logits

    export_merged(base_dir=tiny_base_dir, adapter_dir=tmp_path / "ad", out_dir=tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    base_keys = list(safe_open(tiny_base_dir / "model.safetensors", "pt").keys())
    assert sorted(keys) == sorted(base_keys)
    assert not any("lora" in k or "base_layer" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        # W0 + ΔW is rounded once per weight in fp32; through all 14 merged layers that moves
        # logits of magnitude ~10 by up to a few 1e-5.
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=0)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_merge_state_dict_is_pure():
    w0 = torch.randn(6, 4)
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    base = {"l.weight": w0, "other": torch.ones(3)}
    out = merge_state_dict(base, {"l": (a, b)}, scaling=0.5)
    torch.testing.assert_close(out["l.weight"], w0 + 0.5 * b @ a)
    assert out["other"] is base["other"]
    assert base["l.weight"] is w0 and not torch.equal(out["l.weight"], w0)
