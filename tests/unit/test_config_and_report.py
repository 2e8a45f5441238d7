"""Config validation names the field; the cost report reproduces the textbook arithmetic."""

from __future__ import annotations

import pytest

from workers.base_model import meta_model
from workers.lora import LoraConfig, LoraConfigError, TargetModulesError, match_target_modules
from workers.lora.report import lora_report
from workers.presets import preset_config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=()), "target_modules"),
        (dict(target_modules="(unclosed"), "target_modules"),
        (dict(init="xavier"), "init"),
        (dict(bias="all"), "bias"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(LoraConfigError) as info:
        LoraConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_peft_dict_round_trip():
    cfg = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=("v_proj", "q_proj"),
        use_rslora=True,
        init="kaiming",
    )
    again = LoraConfig.from_peft_dict(cfg.to_peft_dict())
    assert again == LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=("q_proj", "v_proj"),
        use_rslora=True,
        init="kaiming",
    )


def test_llama_7b_textbook_numbers():
    model = meta_model(preset_config("llama-7b"))
    paths = match_target_modules(model, ("q_proj", "v_proj"))
    rep = lora_report(model, paths, r=8)
    q = rep.modules[0]
    assert (q.in_features, q.out_features) == (4096, 4096)
    assert q.lora_params == 65_536 and q.reduction == 256
    assert len(rep.modules) == 64
    assert rep.trainable_params == 4_194_304
    assert rep.adapter_bytes(2) == 8 * 1024 * 1024
    assert 6.7e9 < rep.base_params < 6.8e9
    assert rep.optimizer_bytes_saved == 8 * (rep.base_params - rep.trainable_params)


def test_unknown_target_lists_existing_modules(base):
    model, _ = base
    with pytest.raises(TargetModulesError, match=r"q_proj.*v_proj") as info:
        match_target_modules(model, ("attn_proj",))
    assert "lm_head" not in str(info.value)
    with pytest.raises(TargetModulesError, match="foo"):
        match_target_modules(model, ("q_proj", "foo"))
