"""Causal-LM loss for LoRA training, without materialising the full logits tensor.

With LoRA the output head is frozen, so its backward needs only the gradient with respect to
the hidden states: for a token with hidden h, label y and logits z = W h,
dL/dh = Wᵀ (softmax(z) − onehot(y)). That is computed chunk by chunk *in the forward pass*,
right after each chunk's logits, which are then freed; only dL/dh (tokens × hidden) is kept
for the backward. Same FLOPs as the usual path, but peak memory no longer holds
tokens × vocab logits, their log-softmax and their gradient (at a 32k vocabulary that is most
of the activation memory of a small model). Rows whose label is ignored (prompt tokens) are
dropped before the head, so their logits are never computed at all.

Models whose head is not a plain frozen linear layer (a bias, trainable, softcapped or scaled
logits) fall back to the ordinary logits path, which computes the same number.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.datasets import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(W h_i, y_i), with dL/dh computed during the forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            logits = (h @ weight.t()).float()  # (c, V), freed at the end of this iteration
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            total += (lse - picked).sum()
            if grad_hidden is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None


def _plain_frozen_head(model: nn.Module) -> nn.Linear | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if type(head.weight).__name__ == "DTensor":  # sharded (FSDP): only model() unshards it
        return None
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    if not callable(getattr(model, "get_decoder", None)):
        return None
    return head


def causal_lm_loss_sums(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    groups: list[tuple[int, int]],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[torch.Tensor]:
    """Like ``causal_lm_loss_sum``, one sum per group of rows ``(start, stop)``, from one
    forward pass over the whole batch (a packed batch: each group is one job's rows)."""
    labels = batch["labels"][:, 1:]
    head = _plain_frozen_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = []
        for start, stop in groups:
            part = logits[start:stop, :-1].float().reshape(-1, logits.shape[-1])
            out.append(F.cross_entropy(part, labels[start:stop].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))  # fmt: skip
        return out
    decoder = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state[:, :-1]
    sums = []
    for start, stop in groups:
        keep = labels[start:stop] != IGNORE_INDEX
        rows = hidden[start:stop][keep]
        sums.append(_FrozenHeadCrossEntropy.apply(rows, head.weight, labels[start:stop][keep],
                                                  chunk_tokens))  # fmt: skip
    return sums


def causal_lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled tokens of ``batch``.

    Args:
        model: a Hugging Face causal LM (possibly with LoRA layers).
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX where no loss).
        chunk_tokens: tokens per head chunk (bounds the transient logits memory).

    Returns:
        A scalar float32 tensor (a sum, not a mean: the caller picks the normaliser).
    """
    labels = batch["labels"][:, 1:]
    head = _plain_frozen_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    decoder = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state[:, :-1]
    keep = labels != IGNORE_INDEX
    rows = hidden[keep]  # (tokens with a label, hidden): prompt tokens never reach the head
    targets = labels[keep]
    return _FrozenHeadCrossEntropy.apply(rows, head.weight, targets, chunk_tokens)
