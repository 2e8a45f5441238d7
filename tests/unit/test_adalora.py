"""AdaLoRA against PEFT (the oracle) and its rank allocator: files both ways with equal logits,
the budget schedule, pruning to the target budget, and the plain pair serving uses."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

from workers.base_model import load_base
from workers.datasets import load_dataset
from workers.demo_task import TRAIN_FILE
from workers.lora import LoraConfig, inject_lora, load_adapter, lora_modules, save_adapter
from workers.lora.adalora import RankAllocator, budget_at, to_plain_lora
from workers.lora.config import AdaLoraSchedule
from workers.lora.errors import LoraConfigError
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

SCHEDULE = AdaLoraSchedule(target_r=2, total_step=40, tinit=5, tfinal=10, delta_t=5)
ADA = LoraConfig(r=6, alpha=8, target_modules=("q_proj", "v_proj"), adalora=SCHEDULE)


def _logits(model, batch):  # type: ignore[no-untyped-def]
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_E.copy_(torch.randn(m.lora_E.shape, generator=g))
            m.lora_E[::3] = 0  # pruned triplets are zeros


def test_the_budget_falls_cubically_from_r_to_target_per_layer():
    assert budget_at(5, SCHEDULE, 6, 4) == (24, False)  # until tinit: r per layer
    assert budget_at(10, SCHEDULE, 6, 4)[1] is True  # every delta_t steps
    mid = budget_at(20, SCHEDULE, 6, 4)[0]
    assert 8 < mid < 24 and budget_at(31, SCHEDULE, 6, 4) == (8, True)  # final: target_r
    with pytest.raises(LoraConfigError):
        AdaLoraSchedule(target_r=2, total_step=10, tinit=5, tfinal=5)


def test_ours_loads_in_peft_and_peft_in_ours_with_equal_logits(tiny_base_dir, batch, tmp_path):
    ours, _ = load_base(tiny_base_dir)
    inject_lora(ours, ADA)
    _randomize(ours)
    save_adapter(ours, ADA, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "ours")
    torch.testing.assert_close(_logits(peft_model, batch), _logits(ours, batch), atol=1e-5,
                               rtol=0)  # fmt: skip
    theirs = get_peft_model(load_base(tiny_base_dir)[0], AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=40,
        tinit=5, tfinal=10, deltaT=5))  # fmt: skip
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_E" in name:
                p.normal_(0, 1.0)
    theirs.save_pretrained(tmp_path / "peft")
    loaded, _ = load_base(tiny_base_dir)
    cfg = load_adapter(loaded, tmp_path / "peft")
    assert cfg.method == "adalora" and cfg.r == 6
    torch.testing.assert_close(_logits(loaded, batch), _logits(theirs, batch), atol=1e-5, rtol=0)


def test_the_plain_pair_serving_uses_is_the_same_update():
    g = torch.Generator().manual_seed(0)
    a, b, e = torch.randn(6, 16, generator=g), torch.randn(12, 6, generator=g), torch.randn(6, 1)
    e[[1, 4]] = 0
    a2, b2 = to_plain_lora(a, b, e)
    assert a2.shape == (4, 16) and b2.shape == (12, 4)
    torch.testing.assert_close(b2 @ a2, b @ (a * e))
    z1, z2 = to_plain_lora(a, b, torch.zeros(6, 1))
    assert z1.shape == (1, 16) and not (z2 @ z1).any()


def test_training_prunes_to_the_target_budget(tiny_base_dir, tmp_path):
    model, tok = load_base(tiny_base_dir)
    examples = load_dataset(TRAIN_FILE, tok, seq_len=48)
    recipe = LoraFinetuneRecipe(model, ADA, TrainConfig(max_steps=40, batch_size=8, seq_len=48,
                                                        lr=5e-2, warmup_steps=2),
                                pad_id=tok.pad_token_id)  # fmt: skip
    recipe.setup()
    assert isinstance(recipe.allocator, RankAllocator)
    result = recipe.train(examples)
    ranks = recipe.allocator.ranks()
    assert sum(ranks.values()) == 2 * len(ranks)  # the target budget: 2 per layer on average
    assert result.curve[-1].loss < result.curve[0].loss
    save_adapter(model, ADA, tmp_path / "trained")
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "trained")
    ids = tok(["spell 1 2 ="], return_tensors="pt")
    torch.testing.assert_close(_logits(peft_model, dict(ids)), _logits(model, dict(ids)),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_the_spec_names_the_adalora_fields():
    from orchestrator.spec import SpecError, check_lora_variant

    assert check_lora_variant("adalora", r=12).adalora_target_r == 6  # default: r // 2
    assert check_lora_variant("adalora", r=12, target_r=8).adalora_target_r == 8
    with pytest.raises(SpecError, match=r"target_r \(16\) must be at most r \(12\)"):
        check_lora_variant("adalora", r=12, target_r=16)
    with pytest.raises(SpecError, match="target_r is AdaLoRA's"):
        check_lora_variant("lora", target_r=4)
    with pytest.raises(LoraConfigError, match="do not combine"):
        LoraConfig(r=8, use_dora=True, adalora=AdaLoraSchedule.for_steps(4, 100))
