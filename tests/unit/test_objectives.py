"""The objectives' math: policy-gradient losses at ratio 1, clipping, DPO's first step, GRPO's
advantages; and one core step equals the objective computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from workers.errors import TrainingError
from workers.training.loss import TokenLogprobs
from workers.training.objectives import (
    Dpo,
    cispo_loss,
    dpo_losses,
    group_advantages,
    importance_sampling_loss,
    policy_gradient_loss,
    ppo_loss,
)


def test_at_ratio_one_is_and_ppo_give_minus_sum_a_and_cispo_minus_sum_lp_a():
    lp = torch.tensor([-0.5, -1.25, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    q = lp.detach().clone()
    assert float(importance_sampling_loss(lp.detach(), q, adv)) == pytest.approx(-2.5)
    assert float(ppo_loss(lp, q, adv)) == pytest.approx(-2.5)
    assert float(cispo_loss(lp, q, adv)) == pytest.approx(float(-(lp * adv).sum()))
    # every one of them pushes lp along A at ratio 1: d/dlp = −A
    for name in ("importance_sampling", "ppo", "cispo"):
        lp.grad = None
        policy_gradient_loss(name, lp, q, adv).backward()
        torch.testing.assert_close(lp.grad, -adv)


def test_ppo_clips_the_ratio_in_the_direction_of_the_advantage():
    q = torch.zeros(2)
    lp = torch.tensor([math.log(2.0), math.log(0.5)], requires_grad=True)  # ratios 2 and 0.5
    adv = torch.tensor([1.0, -1.0])
    loss = ppo_loss(lp, q, adv, clip_low=0.8, clip_high=1.2)
    assert float(loss) == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0))
    loss.backward()  # both clipped: no gradient flows
    torch.testing.assert_close(lp.grad, torch.zeros(2))


def test_cispo_keeps_the_gradient_of_a_clipped_token():
    q = torch.zeros(1)
    lp = torch.tensor([math.log(3.0)], requires_grad=True)
    cispo_loss(lp, q, torch.tensor([1.0]), clip_high=1.2).backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.2]))


def test_unknown_policy_loss_is_named():
    with pytest.raises(TrainingError, match="unknown policy loss 'grpo'"):
        policy_gradient_loss("grpo", torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_dpo_starts_at_ln2_with_zero_rewards():
    pol = torch.tensor([-3.0, -5.0])
    losses, chosen, rejected = dpo_losses(pol[:1], pol[1:], pol[:1], pol[1:], beta=0.1)
    assert float(losses) == pytest.approx(math.log(2))
    assert float(chosen) == float(rejected) == 0.0


def test_dpo_objective_sums_rows_and_reports_trl_metrics():
    # two pairs: rows (c0, r0, c1, r1); tokens per row 2, 1, 1, 2
    rows = torch.tensor([0, 0, 1, 2, 3, 3])
    policy = TokenLogprobs(torch.tensor([-1.0, -1.0, -4.0, -2.0, -1.0, -1.0]), rows, 4)
    reference = TokenLogprobs(torch.tensor([-1.5, -1.5, -3.0, -2.0, -0.5, -0.5]), rows, 4)
    loss, (chosen, rejected, margins, accuracies) = Dpo(beta=0.5).loss(policy, reference, [0, 1])
    # pair 0: π_c − ref_c = 1, π_r − ref_r = −1; pair 1: 0 and −1
    expected = -torch.nn.functional.logsigmoid(torch.tensor([0.5 * 2, 0.5 * 1])).sum()
    assert float(loss) == pytest.approx(float(expected))
    assert float(chosen) == pytest.approx(0.5)
    assert float(rejected) == pytest.approx(-1.0)
    assert float(margins) == pytest.approx(1.5)
    assert float(accuracies) == 2.0


def test_group_advantages_are_normalised_and_zero_for_a_flat_group():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert group_advantages([0.3, 0.3]) == [0.0, 0.0]
