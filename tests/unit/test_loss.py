"""The frozen-head chunked loss equals the ordinary logits path, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.datasets import load_dataset
from workers.demo_task import TRAIN_FILE
from workers.lora import LoraConfig, inject_lora, lora_modules, lora_parameters
from workers.training.batches import collate
from workers.training.loss import _plain_frozen_head, causal_lm_loss_sum


def _reference(model, batch):  # type: ignore[no-untyped-def]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        reduction="sum",
    )


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_grads_match_reference(base, chunk):
    model, tok = base
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    examples = load_dataset(TRAIN_FILE, tok, seq_len=64)[:6]
    batch = collate(examples, tok.pad_token_id)
    assert _plain_frozen_head(model) is not None

    ours = causal_lm_loss_sum(model, batch, chunk_tokens=chunk)
    ours.backward()
    grads = [p.grad.clone() for p in lora_parameters(model)]
    for p in lora_parameters(model):
        p.grad = None
    ref = _reference(model, batch)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    for g, p in zip(grads, lora_parameters(model), strict=True):
        # float32 sums in another order: compare against the gradient's own scale
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()


def test_falls_back_when_the_head_is_trainable(base):
    model, tok = base
    model.lm_head.weight.requires_grad_(True)
    assert _plain_frozen_head(model) is None
    batch = collate(load_dataset(TRAIN_FILE, tok, seq_len=64)[:2], tok.pad_token_id)
    torch.testing.assert_close(causal_lm_loss_sum(model, batch), _reference(model, batch))
