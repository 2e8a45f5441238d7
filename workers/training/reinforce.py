"""Reinforcement fine-tuning (GRPO): sample, grade, group-normalise, policy-gradient.

Each step takes its prompts as any method takes its rows, samples ``group_size`` completions
of each with the current adapter — through the serving engine's own decoder
(``workers.serving.stepper.decode_batch``: one sampling implementation in the project) — scores
them with the job's grader, and turns each group's rewards into advantages
(r − mean) / std. The completions become ``Rollout`` items (the sampled tokens, the sampler's
log-probability of each, the advantage) that the token-level policy-gradient loss
(``objectives.policy_gradient_loss``: PPO-clip by default) trains on. No user code runs: the
grader is data (``workers.training.graders``).

Sampling is seeded per (job seed, step, rank, micro-batch, prompt, sample): a resumed run
samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.datasets import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Example
from workers.errors import DatasetError
from workers.serving.decode import DecodeRow, RowOutput
from workers.training.batches import derived_seed
from workers.training.graders import Ask, Grader
from workers.training.loss import TokenLogprobs
from workers.training.objectives import PolicyGradient, Rollout
from workers.training.objectives import group_advantages as _group_advantages

Sample = Callable[[list[DecodeRow]], list[RowOutput]]


@dataclass(frozen=True)
class PromptItem:
    """A prompt to answer: its tokens (the chat with the generation prompt) and its row (the
    fields the grader reads)."""

    prompt_ids: tuple[int, ...]
    row: dict[str, Any]


def prompt_items(
    rows: Sequence[dict[str, Any]], tokenizer: Any, *, seq_len: int, max_new_tokens: int,
    name: str = "data",
) -> list[PromptItem]:  # fmt: skip
    """Tokenize prompt rows (the chat template with its generation prompt).

    Raises:
        DatasetError: no prompt leaves room for ``max_new_tokens`` within ``seq_len``.
    """
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    room = seq_len - max_new_tokens
    out = []
    for row in rows:
        ids = list(tokenizer.apply_chat_template(row["messages"], chat_template=template,
                                                 tokenize=True, return_dict=False,
                                                 add_generation_prompt=True))  # fmt: skip
        if 0 < len(ids) <= room:
            out.append(PromptItem(tuple(ids), dict(row)))
    if not out:
        raise DatasetError(f"{name}: no prompt fits seq_len={seq_len} with room for "
                           f"max_new_tokens={max_new_tokens}")  # fmt: skip
    return out


@dataclass(frozen=True)
class Reinforcement:
    """GRPO as an objective: ``expand`` turns prompts into graded rollouts, ``loss`` is the
    policy gradient over them; metrics are the reward's mean and std over rollouts."""

    grader: Grader
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    loss_fn: str = "ppo"
    name = "reinforcement"
    needs_reference = False
    metric_names: tuple[str, ...] = ("reward/mean", "reward/std")

    def expand(self, prompts: Sequence[PromptItem], sample: Sample, *, seed: int,
               greedy: bool = False, ask: Ask | None = None) -> list[Rollout]:  # fmt: skip
        """Sample (``group_size`` each, or one greedy answer), grade (``ask``: how a
        score_model grader's model answers), and attach advantages."""
        k = 1 if greedy else self.group_size
        rows = [DecodeRow(prompt_ids=p.prompt_ids, max_new_tokens=self.max_new_tokens,
                          temperature=0.0 if greedy else self.temperature,
                          seed=derived_seed(seed, i, j), logprobs=0, deltas=False)
                for i, p in enumerate(prompts) for j in range(k)]  # fmt: skip
        outs = sample(rows)
        rows_of = [p.row for p in prompts for _ in range(k)]  # each sample's prompt row
        all_rewards = self.grader.score_many([o.text for o in outs], rows_of, ask)
        rollouts: list[Rollout] = []
        for i, p in enumerate(prompts):
            group = outs[i * k : (i + 1) * k]
            rewards = all_rewards[i * k : (i + 1) * k]
            advantages = _group_advantages(rewards) if k > 1 else [0.0] * k
            for out, reward, adv in zip(group, rewards, advantages, strict=True):
                tokens = [lp.token for lp in out.logprobs]  # what was sampled, EOS included
                ids = (*p.prompt_ids, *tokens)
                labels = (*([IGNORE_INDEX] * len(p.prompt_ids)), *tokens)
                rollouts.append(Rollout(Example(ids, labels),
                                        tuple(lp.logprob for lp in out.logprobs),
                                        (adv,) * len(tokens), reward))  # fmt: skip
        return rollouts

    def sequences(self, item: Rollout) -> Sequence[Example]:
        return (item.example,)

    def units(self, item: Rollout) -> int:
        return len(item.advantages)

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, _ = PolicyGradient(self.loss_fn).loss(policy, reference, items)
        rewards = torch.tensor([it.reward for it in items], dtype=torch.float64)
        return loss, [rewards.sum(), (rewards**2).sum()]

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means over rollouts → mean and std (the second slot carried E[r²])."""
        mean = metrics.get("reward/mean", 0.0)
        second = metrics.get("reward/std", 0.0)
        return {"reward/mean": mean, "reward/std": math.sqrt(max(0.0, second - mean * mean))}

    def evaluation_loss(self, loss: float, metrics: dict[str, float]) -> float:
        """An evaluation's "loss": the negated mean reward of greedy answers (lower is better,
        as every eval loss)."""
        return -metrics.get("reward/mean", 0.0)
