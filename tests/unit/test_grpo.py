"""GRPO through the training core on the tiny base: rollouts come from the serving engine's
decoder with the current adapter, their sampler log-probabilities equal the trainer's forward,
resuming a step samples the same completions, and the mean reward rises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workers.base_model import load_base
from workers.errors import DatasetError
from workers.lora import LoraConfig
from workers.training.graders import GraderError
from workers.training.methods import Method
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

GRADER = {"type": "text_similarity", "input": "{{sample.output_text}}",
          "reference": "{{item.reference}}", "evaluation_metric": "fuzzy_match"}  # fmt: skip


def _prompts(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"spell {i} ="}],
             "reference": f"{i} {i + 1} {i + 2}"} for i in range(8)]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tiny_base_dir: Path, method: Method, steps: int = 40):  # type: ignore[no-untyped-def]
    model, tok = load_base(tiny_base_dir)
    recipe = LoraFinetuneRecipe(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"),
                                TrainConfig(max_steps=steps, batch_size=4, lr=2e-2,
                                            warmup_steps=0),
                                pad_id=tok.pad_token_id, objective=method.objective(),
                                tokenizer=tok)  # fmt: skip
    recipe.setup()
    return recipe, tok


def test_grpo_raises_the_mean_reward(tiny_base_dir, tmp_path):
    method = Method(type="reinforcement", grader=GRADER, group_size=8, max_new_tokens=8)
    recipe, tok = _recipe(tiny_base_dir, method)
    items = method.load(_prompts(tmp_path), tok, seq_len=64)
    rewards = [recipe.train_step(items).metrics["reward/mean"] for _ in range(40)]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.05, (early, late)


def test_rollouts_carry_the_trainers_log_probabilities(tiny_base_dir, tmp_path):
    method = Method(type="reinforcement", grader=GRADER, group_size=4, max_new_tokens=6)
    recipe, tok = _recipe(tiny_base_dir, method)
    with torch.no_grad():  # an adapter that is not the base
        for p in recipe.params:
            p.add_(torch.randn_like(p) * 0.05)
    items = method.load(_prompts(tmp_path), tok, seq_len=64)
    member = recipe._member()
    trainer = recipe.trainer
    rollouts = trainer._expand(member, items[:2], seed=7)
    again = trainer._expand(member, items[:2], seed=7)
    assert [r.example for r in rollouts] == [r.example for r in again]  # seeded: reproducible
    assert len(rollouts) == 8 and all(len(r.advantages) == len(r.sampling_logprobs)
                                      for r in rollouts)  # fmt: skip
    recipe.model.eval()
    with torch.no_grad():
        lp, _ = trainer._logprobs([r.example for r in rollouts], [(member.key, 0, 8)])
    sampled = torch.tensor([v for r in rollouts for v in r.sampling_logprobs])
    assert (lp.values - sampled).abs().max() <= 2e-3
    groups = [sum(r.advantages[0] for r in rollouts[i : i + 4]) for i in (0, 4)]
    assert groups == pytest.approx([0.0, 0.0], abs=1e-5)  # normalised within each group


def test_bad_reinforcement_input_is_named_before_training(tiny_base_dir, tmp_path):
    with pytest.raises(GraderError, match="unknown grader type"):
        Method(type="reinforcement", grader={"type": "python"})
    with pytest.raises(Exception, match="group_size"):
        Method(type="reinforcement", grader=GRADER, group_size=1)
    _, tok = load_base(tiny_base_dir)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    method = Method(type="reinforcement", grader=GRADER)
    with pytest.raises(GraderError, match=r"lacking.jsonl:1: the grader reads item.reference"):
        method.load(lacking, tok, seq_len=64)
    answered = tmp_path / "answered.jsonl"
    answered.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}],
                                    "reference": "x"}) + "\n")  # fmt: skip
    with pytest.raises(DatasetError, match=r"answered.jsonl:1: messages must end with the user"):
        method.load(answered, tok, seq_len=64)


def test_a_frozen_adapter_over_the_base_answers_as_the_adapter_loaded(tiny_base_dir, tmp_path):
    """A score_model grader's adapter runs as hooks on the trainer's base: the same logits as
    that adapter loaded the ordinary way."""
    from workers.lora import inject_lora, lora_modules, save_adapter
    from workers.lora.io import load_adapter
    from workers.training.frozen_adapter import FrozenAdapter

    model, tok = load_base(tiny_base_dir)
    config = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    inject_lora(model, config)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    saved = save_adapter(model, config, tmp_path / "grader")
    ids = tok(["spell 1 2 3 =", "spell 9 ="], return_tensors="pt", padding=True)
    loaded, _ = load_base(tiny_base_dir)
    load_adapter(loaded, saved)
    plain, _ = load_base(tiny_base_dir)
    with torch.no_grad():
        want = loaded(**ids).logits
        base = plain(**ids).logits
        with FrozenAdapter.from_dir(saved).applied(plain):
            got = plain(**ids).logits
        after = plain(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3  # it did change the answer
    torch.testing.assert_close(after, base)  # and left nothing behind


def test_score_model_asks_a_model_with_the_trained_adapter_off(tiny_base_dir, tmp_path):
    grader = {"type": "multi", "calculate_output": "0.5 * judge + 0.5 * close", "graders": {
        "judge": {"type": "score_model", "model": "base", "range": [0, 10],
                  "input": [{"role": "user", "content": "Rate {{sample.output_text}}: "
                             "{{item.reference}}"}]},
        "close": GRADER}}  # fmt: skip
    method = Method(type="reinforcement", grader=grader, group_size=2, max_new_tokens=4)
    recipe, tok = _recipe(tiny_base_dir, method)
    items = method.load(_prompts(tmp_path), tok, seq_len=64)
    member, trainer = recipe._member(), recipe.trainer
    asked: list[list[str]] = []
    real_ask = trainer.ask

    def ask(m, model, chats):  # type: ignore[no-untyped-def]
        answers = real_ask(m, model, chats)
        asked.append(answers)
        return answers

    trainer.ask = ask  # type: ignore[method-assign]
    rollouts = trainer._expand(member, items[:2], seed=3)
    assert len(asked) == 1 and len(asked[0]) == 4  # one batched call for the four samples
    assert all(0.0 <= r.reward <= 5.5 for r in rollouts)
    # the judge is the base: the policy's adapter is off while it answers
    with torch.no_grad():
        for p in recipe.params:
            p.add_(torch.randn_like(p))
    again = real_ask(member, "base", [[{"role": "user", "content": "Rate x: y"}]])
    plain, _ = load_base(tiny_base_dir)
    from workers.training.core import Trainer

    bare = Trainer(plain, pad_id=tok.pad_token_id, tokenizer=tok)
    assert again == bare.ask(member, "base", [[{"role": "user", "content": "Rate x: y"}]])
    with pytest.raises(GraderError, match="range"):
        Method(type="reinforcement", grader={**grader["graders"]["judge"], "range": [3, 1]})
