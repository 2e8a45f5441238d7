"""PEFT is our oracle: its files load in ours and ours in it, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from workers.base_model import load_base
from workers.lora import (
    AdapterFormatError,
    LoraConfig,
    inject_lora,
    load_adapter,
    lora_modules,
    save_adapter,
)


def _logits(model, batch):  # type: ignore[no-untyped-def]
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model, seed=3):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


CASES = [
    LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
    LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    LoraConfig(r=16, alpha=8, target_modules=("q_proj", "k_proj", "o_proj"), use_rslora=True),
]


@pytest.mark.parametrize("cfg", CASES, ids=["qv", "all-linear", "rslora"])
def test_ours_loads_in_peft_with_equal_logits(tiny_base_dir, batch, tmp_path, cfg):
    ours, _ = load_base(tiny_base_dir)
    inject_lora(ours, cfg)
    _randomize(ours)
    save_adapter(ours, cfg, tmp_path / "ad", base_model_name_or_path=str(tiny_base_dir))

    peft_base, _ = load_base(tiny_base_dir)
    peft_model = PeftModel.from_pretrained(peft_base, tmp_path / "ad")
    torch.testing.assert_close(_logits(peft_model, batch), _logits(ours, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=32, target_modules="all-linear"),
        dict(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "down_proj"],
            use_rslora=True,
            init_lora_weights="gaussian",
        ),
    ],
    ids=["qv", "all-linear", "rslora"],
)
def test_peft_adapter_loads_in_ours_with_equal_logits(tiny_base_dir, batch, tmp_path, peft_kwargs):
    peft_base, _ = load_base(tiny_base_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(peft_base, PeftLoraConfig(task_type="CAUSAL_LM", **peft_kwargs))
    with torch.no_grad():  # non-zero B so the adapter actually changes the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft-ad")
    expected = _logits(peft_model, batch)

    ours, _ = load_base(tiny_base_dir)
    cfg = load_adapter(ours, tmp_path / "peft-ad")
    assert cfg.r == peft_kwargs["r"]
    torch.testing.assert_close(_logits(ours, batch), expected, atol=1e-5, rtol=0)


def test_saved_files_use_peft_keys_and_shapes(base, tmp_path):
    model, _ = base
    cfg = LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
    inject_lora(model, cfg)
    save_adapter(model, cfg, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (8, 128) and b.shape == (128, 8)
    assert len(state) == 2 * 2 * 2  # layers × {q, v} × {A, B}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16


def _saved_adapter(model, tmp_path):  # type: ignore[no-untyped-def]
    cfg = LoraConfig(r=4, target_modules=("q_proj",))
    inject_lora(model, cfg)
    return save_adapter(model, cfg, tmp_path / "ad")


def test_unexpected_key_is_an_error(tiny_base_dir, tmp_path):
    model, _ = load_base(tiny_base_dir)
    ad = _saved_adapter(model, tmp_path)
    state = load_file(ad / "adapter_model.safetensors")
    state["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(state, ad / "adapter_model.safetensors")
    fresh, _ = load_base(tiny_base_dir)
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        load_adapter(fresh, ad)


def test_missing_key_is_an_error(tiny_base_dir, tmp_path):
    model, _ = load_base(tiny_base_dir)
    ad = _saved_adapter(model, tmp_path)
    state = load_file(ad / "adapter_model.safetensors")
    del state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(state, ad / "adapter_model.safetensors")
    fresh, _ = load_base(tiny_base_dir)
    with pytest.raises(AdapterFormatError, match="no lora_B"):
        load_adapter(fresh, ad)


def test_missing_module_against_existing_lora_layers_is_an_error(tiny_base_dir, tmp_path):
    model, _ = load_base(tiny_base_dir)
    ad = _saved_adapter(model, tmp_path)
    other, _ = load_base(tiny_base_dir)
    inject_lora(other, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    with pytest.raises(AdapterFormatError, match="missing"):
        load_adapter(other, ad)


def test_pickle_weights_are_refused(tmp_path, base):
    model, _ = base
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig().to_peft_dict()))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(model, tmp_path)


def test_unsupported_peft_feature_is_refused(tmp_path, base):
    model, _ = base
    cfg = LoraConfig().to_peft_dict()
    cfg["lora_bias"] = True  # a feature that changes the math and lorafleet lacks
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="lora_bias"):
        load_adapter(model, tmp_path)


def test_adapter_for_another_base_shape(tmp_path, base):
    from workers.tiny_base import TinySpec, create_tiny_base

    other_dir = create_tiny_base(tmp_path / "other", TinySpec(hidden=64))
    other, _ = load_base(other_dir)
    cfg = LoraConfig(r=4)
    inject_lora(other, cfg)
    save_adapter(other, cfg, tmp_path / "ad")
    model, _ = base
    with pytest.raises(AdapterFormatError, match="another base shape"):
        load_adapter(model, tmp_path / "ad")
