"""Training objectives: a loss from the policy's per-token log-probabilities and the batch.

A method is an objective, nothing more: the training core (``workers.training.core``) runs
the same step for all of them. The loss functions at the top are pure tensor math, free of
jobs, data formats and Ray, so the Tinker-compatible API can call them as they are; the
``Objective`` classes below them say how a method's items (an SFT row, a preference pair, a
rollout) become the sequences forwarded and which loss scores them.

Every loss is a *sum* over its tokens or pairs; the core divides by the global batch's
``units`` (loss tokens for SFT and policy gradients, pairs for DPO), so gradients do not
depend on how a batch is split across workers and accumulation steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from workers.datasets import IGNORE_INDEX, Example
from workers.errors import TrainingError
from workers.method_data import PreferencePair
from workers.training.batches import n_loss_tokens
from workers.training.loss import TokenLogprobs

# -- pure losses ----------------------------------------------------------------------------


def cross_entropy_loss(logprobs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ w·lp: supervised fine-tuning (weights default to 1)."""
    return -(logprobs if weights is None else logprobs * weights).sum()


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair, and the implied rewards (Rafailov et al. 2023; TRL's
    ``loss_type="sigmoid"``): −log σ(β·((π_c − ref_c) − (π_r − ref_r))), from sequence
    log-likelihoods.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (pairs,); rewards are
        β·(π − ref), detached.
    """
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _ratio(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp(logprobs - sampling_logprobs)


def importance_sampling_loss(
    logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """−Σ (p/q)·A: the policy gradient corrected for the sampler's distribution q."""
    return -(_ratio(logprobs, sampling_logprobs) * advantages).sum()


def ppo_loss(
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.8,
    clip_high: float = 1.2,
) -> torch.Tensor:
    """−Σ min(r·A, clip(r, low, high)·A), r = p/q (PPO's clipped surrogate, per token)."""
    ratio = _ratio(logprobs, sampling_logprobs)
    clipped = ratio.clamp(clip_low, clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages).sum()


def cispo_loss(
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.8,
    clip_high: float = 1.2,
) -> torch.Tensor:
    """−Σ sg(clip(r))·lp·A (CISPO: the clipped ratio weights, never blocks, the gradient)."""
    weight = _ratio(logprobs, sampling_logprobs).clamp(clip_low, clip_high).detach()
    return -(weight * logprobs * advantages).sum()


POLICY_LOSSES = ("importance_sampling", "ppo", "cispo")


def policy_gradient_loss(
    name: str,
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.8,
    clip_high: float = 1.2,
) -> torch.Tensor:
    """One of ``POLICY_LOSSES`` by name.

    Raises:
        TrainingError: an unknown loss name.
    """
    if name == "importance_sampling":
        return importance_sampling_loss(logprobs, sampling_logprobs, advantages)
    if name == "ppo":
        return ppo_loss(logprobs, sampling_logprobs, advantages, clip_low=clip_low,
                        clip_high=clip_high)  # fmt: skip
    if name == "cispo":
        return cispo_loss(logprobs, sampling_logprobs, advantages, clip_low=clip_low,
                          clip_high=clip_high)  # fmt: skip
    raise TrainingError(f"unknown policy loss {name!r}; use one of {', '.join(POLICY_LOSSES)}")


def group_advantages(rewards: Sequence[float], *, eps: float = 1e-6) -> list[float]:
    """GRPO's advantages of one group of samples of the same prompt: (r − mean) / (std + ε)
    (population std; a group whose rewards are all equal teaches nothing: zeros)."""
    t = torch.tensor(list(rewards), dtype=torch.float64)
    centred = t - t.mean()
    std = t.std(unbiased=False)
    return (centred / (std + eps)).tolist() if float(std) > 0 else [0.0] * len(rewards)


# -- objectives: how a method's items become sequences and a loss -------------------------


class Objective(Protocol):
    """A training method as the core sees it.

    Attributes:
        name: the method's name (``supervised``, ``dpo``, ``reinforcement``).
        needs_reference: whether ``loss`` needs the reference model's log-probabilities.
        metric_names: the per-step statistics ``loss`` returns sums of, in this order.
    """

    @property
    def name(self) -> str: ...

    @property
    def needs_reference(self) -> bool: ...

    @property
    def metric_names(self) -> tuple[str, ...]: ...

    def sequences(self, item: Any) -> Sequence[Example]:
        """The rows one item forwards (labels mark the tokens it scores)."""
        ...

    def units(self, item: Any) -> int:
        """What one item adds to the loss's normaliser."""
        ...

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss *sum* over ``items`` and the sums of ``metric_names``."""
        ...


class Supervised:
    """Supervised fine-tuning: cross-entropy on the labelled tokens."""

    name = "supervised"
    needs_reference = False
    metric_names: tuple[str, ...] = ()

    def sequences(self, item: Example) -> Sequence[Example]:
        return (item,)

    def units(self, item: Example) -> int:
        return n_loss_tokens(item)

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return cross_entropy_loss(policy.values), []


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass(frozen=True)
class Dpo:
    """Direct preference optimisation (sigmoid loss); metrics under TRL's names."""

    beta: float = 0.1
    name = "dpo"
    needs_reference = True
    metric_names: tuple[str, ...] = DPO_METRICS

    def sequences(self, item: PreferencePair) -> Sequence[Example]:
        return (item.chosen, item.rejected)

    def units(self, item: PreferencePair) -> int:
        return 1

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        assert reference is not None, "DPO needs the reference's log-probabilities"
        pol, ref = policy.row_sums(), reference.row_sums().detach()
        losses, chosen, rejected = dpo_losses(pol[0::2], pol[1::2], ref[0::2], ref[1::2],
                                              beta=self.beta)  # fmt: skip
        stats = [chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                 (chosen > rejected).float().sum()]  # fmt: skip
        return losses.sum(), stats


@dataclass(frozen=True)
class Rollout:
    """A sampled completion to learn from: the full row (labels on the completion), and per
    labelled token the sampler's log-probability and the advantage."""

    example: Example
    sampling_logprobs: tuple[float, ...]
    advantages: tuple[float, ...]
    reward: float = 0.0  # what the grader gave it (reported, not trained on directly)


@dataclass(frozen=True)
class PolicyGradient:
    """Token-level policy gradient over rollouts (GRPO's update once advantages are set)."""

    loss_fn: str = "ppo"
    clip_low: float = 0.8
    clip_high: float = 1.2
    name = "reinforcement"
    needs_reference = False
    metric_names: tuple[str, ...] = ()

    def sequences(self, item: Rollout) -> Sequence[Example]:
        return (item.example,)

    def units(self, item: Rollout) -> int:
        return n_loss_tokens(item.example)

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dev = policy.values.device
        q = torch.tensor([v for it in items for v in it.sampling_logprobs], device=dev)
        adv = torch.tensor([v for it in items for v in it.advantages], device=dev)
        if q.shape != policy.values.shape or adv.shape != policy.values.shape:
            raise TrainingError(f"rollouts carry {q.numel()} sampling log-probabilities and "
                                f"{adv.numel()} advantages for {policy.values.numel()} "
                                "tokens")  # fmt: skip
        return policy_gradient_loss(self.loss_fn, policy.values, q, adv, clip_low=self.clip_low,
                                    clip_high=self.clip_high), []  # fmt: skip


# -- per-token losses over caller-built datums (the Tinker-compatible API) -------------------

TOKEN_LOSSES = ("cross_entropy", *POLICY_LOSSES)
TOKEN_LOSS_INPUTS = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cispo": ("logprobs", "advantages"),
}


@dataclass(frozen=True)
class TokenDatum:
    """One sequence whose every position is scored: ``tokens[i]`` predicts ``targets[i]``
    (Tinker's datum), with the per-position inputs its loss needs (``weights``, or the
    sampler's ``logprobs`` and the ``advantages``), each as long as ``tokens``."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]
    inputs: dict[str, tuple[float, ...]]

    def example(self, pad_id: int) -> Example:
        """The row the core forwards: labels[t] is scored from position t − 1, so the
        targets sit one place right and a pad closes the row (no position attends to it)."""
        return Example(input_ids=(*self.tokens, pad_id), labels=(IGNORE_INDEX, *self.targets))


@dataclass(frozen=True)
class TokenLoss:
    """A loss summed over every position of caller-built datums (no normaliser: the caller
    chooses its own weights), by name: ``cross_entropy`` −Σ w·lp, or a policy loss."""

    loss_fn: str
    pad_id: int
    clip_low: float = 0.8
    clip_high: float = 1.2
    name = "tinker"
    needs_reference = False
    metric_names: tuple[str, ...] = ()

    def sequences(self, item: TokenDatum) -> Sequence[Example]:
        return (item.example(self.pad_id),)

    def units(self, item: TokenDatum) -> int:
        return 1

    def loss(
        self, policy: TokenLogprobs, reference: TokenLogprobs | None, items: Sequence[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dev = policy.values.device

        def gather(name: str) -> torch.Tensor:
            return torch.tensor([v for it in items for v in it.inputs[name]], device=dev,
                                dtype=policy.values.dtype)  # fmt: skip

        if self.loss_fn == "cross_entropy":
            return cross_entropy_loss(policy.values, gather("weights")), []
        return policy_gradient_loss(self.loss_fn, policy.values, gather("logprobs"),
                                    gather("advantages"), clip_low=self.clip_low,
                                    clip_high=self.clip_high), []  # fmt: skip
