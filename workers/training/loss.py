"""Per-token log-probabilities of the labelled tokens, without materialising the full logits.

Every training objective is a function of the policy's log-probabilities of the tokens it
scores (``workers.training.objectives``), so this is the one forward every method uses.

With LoRA the output head is frozen, so the backward needs only the gradient with respect to
the hidden states: for a token with hidden h, label y and logits z = W h,
d log p(y)/dh = Wᵀ (onehot(y) − softmax(z)). That is computed chunk by chunk *in the forward
pass*, right after each chunk's logits, which are then freed; only that (tokens × hidden)
matrix is kept, and the backward scales each of its rows by the incoming gradient of that
token's log-probability. Same FLOPs as the usual path, but peak memory no longer holds
tokens × vocab logits, their log-softmax and their gradient (at a 32k vocabulary that is most
of the activation memory of a small model). Rows whose label is ignored (prompt tokens) are
dropped before the head, so their logits are never computed at all.

Models whose head is not a plain frozen linear layer (a bias, trainable, softcapped or scaled
logits) fall back to the ordinary logits path, which computes the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.datasets import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


class _FrozenHeadLogprob(torch.autograd.Function):
    """log softmax(W h_i)[y_i] per row i, with d/dh computed during the forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            logits = (h @ weight.t()).float()  # (c, V), freed at the end of this iteration
            lse = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk] = logits.gather(1, y.unsqueeze(1)).squeeze(1) - lse
            if grad_hidden is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_().neg_()  # −softmax, in place
                probs[torch.arange(y.shape[0], device=y.device), y] += 1.0
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype).unsqueeze(1), None, None, None


@dataclass
class TokenLogprobs:
    """Log-probabilities of a batch's labelled tokens (after the causal shift), row-major.

    Attributes:
        values: (T,) float32, one per labelled token, differentiable.
        rows: (T,) the batch row each token belongs to.
        n_rows: rows in the batch (a row may have no labelled token).
    """

    values: torch.Tensor
    rows: torch.Tensor
    n_rows: int

    def select(self, start: int, stop: int) -> TokenLogprobs:
        """Rows ``[start, stop)`` as a batch of their own (row indices rebased)."""
        keep = (self.rows >= start) & (self.rows < stop)
        return TokenLogprobs(self.values[keep], self.rows[keep] - start, stop - start)

    def row_sums(self) -> torch.Tensor:
        """(n_rows,) the sum of each row's log-probabilities (a sequence's log-likelihood)."""
        out = torch.zeros(self.n_rows, dtype=self.values.dtype, device=self.values.device)
        return out.index_add(0, self.rows, self.values)


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


def token_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> TokenLogprobs:
    """Log-probabilities of every labelled token of ``batch``, from one forward.

    Args:
        model: a Hugging Face causal LM (possibly with LoRA layers).
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX where no token
            is scored); ``labels[i, t]`` is scored as the prediction from position ``t − 1``.
        chunk_tokens: tokens per head chunk (bounds the transient logits memory).
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]  # row-major, the order of tensor[keep]
    targets = labels[keep]
    head = _plain_frozen_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked = logits[:, :-1][keep].float()
        values = picked.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return TokenLogprobs(values, rows, labels.shape[0])
    decoder = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state[:, :-1]
    # prompt tokens never reach the head
    values = _FrozenHeadLogprob.apply(hidden[keep], head.weight, targets, chunk_tokens)
    return TokenLogprobs(values, rows, labels.shape[0])


def causal_lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled tokens of ``batch`` (a sum, not a
    mean: the caller picks the normaliser)."""
    return -token_logprobs(model, batch, chunk_tokens=chunk_tokens).values.sum()
