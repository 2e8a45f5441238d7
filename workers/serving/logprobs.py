"""Log-probabilities of tokens, as the model gives them: log-softmax of the raw logits.

What a client asks for with ``logprobs`` (and ``echo``): for each token, its own
log-probability and the ``k`` most likely tokens at that position with theirs. They are
computed from the logits before temperature, top-p or any other change the sampler makes
(OpenAI's and vLLM's convention), in float32, so they equal a plain forward of the same model
and adapter — PEFT's, in the tests — whatever the request's sampling settings.

Pure torch; the wire shapes (OpenAI's completions and chat forms) are ``openai_api``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on ``logprobs`` / ``top_logprobs``
FLOOR = -9999.0  # a token the model rules out (-inf) is reported as this (JSON has no -inf)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int]
) -> list[TokenLogprob]:
    """Log-probabilities of ``tokens[i]`` under ``logits[i]`` with the ``top_n[i]`` best.

    Args:
        logits: ``(k, vocab)`` raw logits, one row per position.
        tokens: the token at each position (sampled, or the prompt's next token).
        top_n: how many of the most likely tokens each position reports (0: none).
    """
    if logits.shape[0] == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)
    own = lp.gather(1, ids[:, None])[:, 0].clamp_min(FLOOR).tolist()
    k = max(top_n)
    if k > 0:
        values, index = lp.topk(k, dim=-1)
        top_values = values.clamp_min(FLOOR).tolist()
        top_index = index.tolist()
    out = []
    for i, tok in enumerate(tokens):
        n = top_n[i]
        top = tuple(zip(top_index[i][:n], top_values[i][:n], strict=True)) if n > 0 else ()
        out.append(TokenLogprob(int(tok), float(own[i]), top))
    return out
