"""DPO through the training core equals TRL's ``DPOTrainer`` (with PEFT) on the same batch:
the cold start (reference = the adapter off) and the warm start (reference = a frozen copy of
the starting adapter, which TRL loads as its "ref" adapter)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from workers.base_model import load_base
from workers.datasets import IGNORE_INDEX, Example
from workers.lora.io import load_adapter
from workers.method_data import PreferencePair
from workers.training.objectives import Dpo
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

pytest.importorskip("trl")


def _trl(tiny_base_dir: Path, *, warm: bool):  # type: ignore[no-untyped-def]
    """TRL's loss and metrics on its first batch, and that batch as our pairs."""
    from datasets import Dataset
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    model, tok = load_base(tiny_base_dir)
    config = PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if warm:  # the adapter training starts from (TRL copies it as the reference)
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        start = Path(tempfile.mkdtemp())
        peft.save_pretrained(start)
    rows = [{"prompt": f"spell {i} =", "chosen": f" {i} {i + 1} {i + 2}",
             "rejected": f" no {i * 3}"} for i in range(8)]  # fmt: skip
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, beta=0.1,
                     report_to=[], use_cpu=True, max_length=64)  # fmt: skip
    trainer = DPOTrainer(model=peft, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)  # fmt: skip
    with torch.no_grad():  # the policy moves away from its start (and from the reference)
        for name, p in peft.named_parameters():
            if "lora_" in name and ".ref." not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        moved = Path(tempfile.mkdtemp())
        peft.save_pretrained(moved)
    batch = next(iter(trainer.get_train_dataloader()))
    peft.train()
    loss = trainer.compute_loss(peft, batch)
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if v}
    half = batch["input_ids"].shape[0] // 2

    def example(i: int) -> Example:
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        keep = batch["completion_mask"][i, :n].tolist()
        labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)]
        return Example(tuple(ids), tuple(labels))

    pairs = [PreferencePair(example(i), example(half + i)) for i in range(half)]
    return float(loss), metrics, pairs, start, moved


@pytest.mark.parametrize("warm", [False, True], ids=["cold-start", "warm-start"])
def test_dpo_loss_equals_trl_dpo_trainer(tiny_base_dir, warm):
    trl_loss, trl_metrics, pairs, start, moved = _trl(tiny_base_dir, warm=warm)
    model, tok = load_base(tiny_base_dir)
    from workers.lora.io import read_adapter_config

    lora = read_adapter_config(start)
    recipe = LoraFinetuneRecipe(model, lora, TrainConfig(batch_size=4, max_steps=1),
                                pad_id=tok.pad_token_id, objective=Dpo(beta=0.1))  # fmt: skip
    recipe.setup(init_adapter=start if warm else None)
    load_adapter(model, moved)  # the policy TRL scores
    member = recipe._member()
    ours = recipe.trainer.evaluate(member.key, pairs)
    assert abs(ours.loss - trl_loss) <= 1e-5, (ours.loss, trl_loss)
    assert not math.isclose(ours.loss, math.log(2), abs_tol=1e-4)  # the policy did move
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours.metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_first_dpo_step_is_ln2_cold_and_warm(tiny_base_dir):
    _, _, pairs, start, _ = _trl(tiny_base_dir, warm=True)
    for init in (None, start):
        model, tok = load_base(tiny_base_dir)
        from workers.lora.io import read_adapter_config

        recipe = LoraFinetuneRecipe(model, read_adapter_config(start),
                                    TrainConfig(batch_size=4, max_steps=3, warmup_steps=0),
                                    pad_id=tok.pad_token_id, objective=Dpo())  # fmt: skip
        recipe.setup(init_adapter=init)
        first = recipe.train_step(pairs)
        assert first.loss == pytest.approx(math.log(2), abs=1e-6)
        assert first.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        later = [recipe.train_step(pairs).loss for _ in range(2)]
        assert later[-1] < math.log(2)  # and it learns


def test_reference_log_probabilities_are_computed_once_per_row(tiny_base_dir, monkeypatch):
    """The reference never changes, so a row's reference values are kept: from the second
    epoch a step runs no reference forward, and the losses are those of recomputing them."""
    import workers.training.core as core

    _, _, pairs, start, _ = _trl(tiny_base_dir, warm=False)
    from workers.lora.io import read_adapter_config

    def run(cache_tokens: int) -> tuple[list[float], int]:
        monkeypatch.setattr(core, "REFERENCE_CACHE_TOKENS", cache_tokens)
        forwards = []
        real = core.reference_weights

        def counting(members):  # type: ignore[no-untyped-def]
            forwards.append(1)
            return real(members)

        monkeypatch.setattr(core, "reference_weights", counting)
        model, tok = load_base(tiny_base_dir)
        recipe = LoraFinetuneRecipe(model, read_adapter_config(start),
                                    TrainConfig(batch_size=2, max_steps=6, warmup_steps=0),
                                    pad_id=tok.pad_token_id, objective=Dpo())  # fmt: skip
        recipe.setup()
        return [recipe.train_step(pairs).loss for _ in range(6)], len(forwards)

    cached, cached_forwards = run(1 << 20)
    fresh, fresh_forwards = run(0)
    assert fresh_forwards == 6 and cached_forwards == 2  # 4 pairs, 2 a step: one epoch
    assert max(abs(a - b) for a, b in zip(cached, fresh, strict=True)) <= 1e-5
