"""The rules of decoding one request, whatever it is batched with.

A request (``DecodeRow``) has its own ``max_new_tokens``, greedy or temperature / top-p
sampling with its own seeded generator (so a seeded request is reproducible whatever it is
batched with), stop strings, and optionally the log-probabilities of the tokens it samples
(``logprobs``) and of its prompt's tokens (``prompt_logprobs``, for ``echo``). Text reaches a
client as deltas that never contain a stop string or half a UTF-8 character
(``TextTracker``). ``stepper.py`` runs the batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.serving.logprobs import TokenLogprob
from workers.serving.multi_lora import BASE_SLOT


@dataclass(frozen=True)
class DecodeRow:
    """One request as the decoder sees it."""

    prompt_ids: Sequence[int]
    slot: int = BASE_SLOT
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (benchmarks)
    logprobs: int | None = None  # sampled tokens' log-probabilities with this many top ones
    prompt_logprobs: int | None = None  # the prompt's too (echo); None: not computed
    deltas: bool = True  # text as it is decoded (streaming); False: decoded once at the end
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    stop_token_ids: tuple[int, ...] = ()  # these end the row as EOS does (kept in stop_token)
    grammar: Any = None  # a ``grammar.Compiled``: the row decodes only what it allows


@dataclass
class RowOutput:
    """What a row produced: its tokens, its text (stops removed) and why it ended.

    ``logprobs`` has one entry per sampled token when the row asked for them (a token cut by
    a stop string included); ``prompt_logprobs`` one per prompt token, the first ``None``.
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" or "error"
    stop_token: int | None = None  # the EOS or stop token that ended the row (not in token_ids)
    error: str | None = None  # why this row alone failed (its batch-mates went on)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)


class TextTracker:
    """Incremental detokenization with stop strings: emits only text that is final.

    Each update decodes only a short window of the newest tokens (the offsets method of
    text-generation-inference): the text of ``ids[prefix:read]`` is already known, so the new
    text is what ``ids[prefix:]`` adds to it. Decoding both from the same token keeps
    tokenizers that treat a leading space specially exact, and a step costs the same at token
    10 and at token 4,000 (decoding everything every step would make an answer quadratic).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0
        self.text = ""
        self.stopped = False
        self._decoded = ""  # the text of token_ids[:read]
        self._prefix = self._read = 0

    def _advance(self, token_ids: list[int], final: bool) -> None:
        decode = self.tokenizer.decode
        known = decode(token_ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(token_ids[self._prefix :], skip_special_tokens=True)
        if len(window) <= len(known):
            return  # nothing visible yet (a special token, or half a character)
        if window.endswith("\ufffd") and not final:
            return  # an incomplete multi-byte character: wait for the next token
        self._decoded += window[len(known) :]
        self._prefix, self._read = self._read, len(token_ids)

    def update(self, token_ids: list[int], *, final: bool) -> str:
        """Feed all tokens so far; returns the new text that may be shown now."""
        self._advance(token_ids, final)
        text = self._decoded
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        self.text = text
        safe = len(text) if final else len(text) - self.holdback
        if safe <= self.emitted:
            return ""
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta


def choose_tokens(
    logits: torch.Tensor, rows: Sequence[DecodeRow], gens: list[Any], done: list[bool]
) -> tuple[torch.Tensor, dict[int, str]]:
    """Next token per row: argmax for greedy rows, temperature/top-k/top-p sampling for the
    rest.

    Returns the tokens and, for rows whose sampling failed, why — those rows fail alone.
    """
    chosen = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    for i, row in enumerate(rows):
        if row.temperature <= 0 or done[i]:
            continue
        try:
            scaled = logits[i].float() / row.temperature
            if 0 < row.top_k < scaled.shape[-1]:
                kth = scaled.topk(row.top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise ValueError(f"temperature {row.temperature:g} gives no usable distribution")
            if row.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < row.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            chosen[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
        except (RuntimeError, ValueError) as exc:
            failed[i] = f"sampling failed: {exc}"
    return chosen, failed


def row_generator(row: DecodeRow, device: torch.device) -> Any:
    """A seeded generator for a sampling row (None for greedy rows)."""
    if row.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(row.seed if row.seed is not None else int(torch.randint(2**62, ()).item()))
    return g


def choice_seed(seed: int | None, prompt_index: int, choice: int) -> int | None:
    """The seed of one choice of a request: its prompt's place and its own, mixed into the
    request's ``seed``, so every choice differs and the whole response is reproducible.

    The first choice of the first prompt keeps ``seed`` itself (a one-choice request samples
    what it always did).
    """
    if seed is None:
        return None
    if prompt_index == 0 and choice == 0:
        return seed
    mixed = hashlib.sha256(f"{seed}:{prompt_index}:{choice}".encode()).digest()
    return int.from_bytes(mixed[:8], "little") >> 1  # within what a generator accepts
