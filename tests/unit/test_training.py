"""The recipe learns the demo task, deterministically, touching only LoRA weights."""

from __future__ import annotations

import json

import pytest
import torch

from workers.base_model import load_base
from workers.datasets import load_dataset, read_jsonl
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE, exact_match
from workers.errors import TrainingError
from workers.generate import greedy_generate
from workers.lora import LoraConfig, load_adapter
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig
from workers.training.single import train_single


def test_training_lowers_eval_loss_and_raises_exact_match(tiny_base_dir, tmp_path):
    rows = read_jsonl(HELDOUT_FILE)[:32]
    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    base_model, tok = load_base(tiny_base_dir)
    base_em = exact_match(greedy_generate(base_model, tok, prompts, max_new_tokens=8), refs)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}

    out = train_single(
        base_dir=tiny_base_dir,
        data_path=TRAIN_FILE,
        eval_path=HELDOUT_FILE,
        out_dir=tmp_path / "ad",
        lora=LoraConfig(r=8, alpha=16),
        train=TrainConfig(max_steps=200, lr=3e-3, batch_size=16, seq_len=64, eval_every=100),
    )
    res = out.result
    assert res.eval_loss_final < 0.5 * res.eval_loss_initial
    metrics = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert len(metrics["curve"]) == 200 and metrics["tokens_per_s"] > 0
    assert metrics["dataset_sha256"] == out.dataset_sha256

    model, tok = load_base(tiny_base_dir)
    load_adapter(model, tmp_path / "ad")
    adapter_em = exact_match(greedy_generate(model, tok, prompts, max_new_tokens=8), refs)
    assert adapter_em >= base_em + 0.5
    plain = {
        k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k
    }
    assert all(torch.equal(plain[k], v) for k, v in base_state.items())


def _run(tiny_base_dir, steps=6, **kw):  # type: ignore[no-untyped-def]
    model, tok = load_base(tiny_base_dir)
    examples = load_dataset(TRAIN_FILE, tok, seq_len=64)[:200]
    rec = LoraFinetuneRecipe(
        model, LoraConfig(r=4), TrainConfig(max_steps=steps, **kw), pad_id=tok.pad_token_id
    )
    rec.setup()
    return [r.loss for r in rec.train(examples).curve], model


def test_same_seed_same_curve_and_different_seed_differs(tiny_base_dir):
    a, _ = _run(tiny_base_dir, seed=1, batch_size=4)
    b, _ = _run(tiny_base_dir, seed=1, batch_size=4)
    c, _ = _run(tiny_base_dir, seed=2, batch_size=4)
    assert a == b
    assert a != c


def test_accumulation_equals_larger_batch(tiny_base_dir):
    big, _ = _run(tiny_base_dir, seed=3, batch_size=8, grad_accum=1)
    acc, _ = _run(tiny_base_dir, seed=3, batch_size=4, grad_accum=2)
    assert big == pytest.approx(acc, abs=1e-5)


@pytest.mark.parametrize(("field", "value"), [("max_steps", 0), ("lr", 0.0), ("batch_size", -1)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(TrainingError, match=f"^{field}:"):
        TrainConfig(**{field: value})
