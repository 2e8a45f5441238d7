"""One decode loop for a batch whose rows differ in adapter, length, sampling and stops.

Every step is one forward pass over the whole batch with the KV cache: rows for different
adapters share the base GEMMs (``MultiLoraLinear`` gathers each row's A and B by slot). Each
row has its own ``max_new_tokens``, temperature / top-p (with its own seeded generator, so a
seeded request is reproducible whatever it is batched with) and stop strings. Text reaches
``on_step`` as deltas that never contain a stop string or half a UTF-8 character, which is
what a streaming client needs.

Prompts are left-padded; positions come from the attention mask, so a padded row computes
exactly what it computes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.serving.multi_lora import BASE_SLOT, MultiLoraLinear, set_batch_slots


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


@dataclass
class RowOutput:
    """What a row produced: its tokens, its text (stops removed) and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" or "error"
    error: str | None = None  # why this row alone failed (its batch-mates went on)


class TextTracker:
    """Incremental detokenization with stop strings: emits only text that is final."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def update(self, token_ids: list[int], *, final: bool) -> str:
        """Feed all tokens so far; returns the new text that may be shown now."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        self.text = text
        safe = len(text) if final else len(text) - self.holdback
        while not final and safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete multi-byte character: wait for the next token
        if safe <= self.emitted:
            return ""
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta


def _choose(
    logits: torch.Tensor, rows: Sequence[DecodeRow], gens: list[Any], done: list[bool]
) -> tuple[torch.Tensor, dict[int, str]]:
    """Next token per row: argmax for greedy rows, temperature/top-p sampling for the rest.

    Returns the tokens and, for rows whose sampling failed, why — those rows fail alone.
    """
    chosen = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    for i, row in enumerate(rows):
        if row.temperature <= 0 or done[i]:
            continue
        try:
            probs = torch.softmax(logits[i].float() / row.temperature, dim=-1)
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


def _generator(row: DecodeRow, device: torch.device) -> Any:
    """A seeded generator for a sampling row (None for greedy rows)."""
    if row.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(row.seed if row.seed is not None else int(torch.randint(2**62, ()).item()))
    return g


@torch.no_grad()
def decode_batch(
    model: nn.Module,
    tokenizer: Any,
    layers: dict[str, MultiLoraLinear],
    rows: Sequence[DecodeRow],
    *,
    on_step: Callable[[list[str | None]], None] | None = None,
) -> list[RowOutput]:
    """Decode every row to its end; ``on_step`` gets one text delta per row per step.

    A delta is ``None`` for a row that had already finished before the step.
    """
    if not rows:
        return []
    for row in rows:
        if row.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if not row.prompt_ids:
            raise ValueError("empty prompt")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(list(r.prompt_ids))
        mask[i, width - len(r.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outputs = [RowOutput() for _ in rows]
    trackers = [TextTracker(tokenizer, r.stop) for r in rows]
    done = [False] * len(rows)
    gens: list[Any] = []
    for i, r in enumerate(rows):
        try:
            gens.append(_generator(r, device))
        except (RuntimeError, ValueError) as exc:  # e.g. a seed out of range: this row only
            gens.append(None)
            outputs[i].error, outputs[i].finish_reason, done[i] = str(exc), "error", True
    set_batch_slots(layers, torch.tensor([r.slot for r in rows], device=device))
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        step = 0
        while True:
            logits = out.logits[:, -1, :]
            for i, r in enumerate(rows):
                if step < r.min_new_tokens and eos is not None:
                    logits[i, eos] = float("-inf")
            nxt, failed = _choose(logits, rows, gens, done)
            deltas: list[str | None] = []
            for i, r in enumerate(rows):
                if done[i]:
                    deltas.append(None)
                    continue
                if i in failed:
                    o = outputs[i]
                    o.error, o.finish_reason, done[i] = failed[i], "error", True
                    deltas.append(None)
                    continue
                tok = int(nxt[i])
                o = outputs[i]
                if tok == eos:
                    o.finish_reason, done[i] = "stop", True
                else:
                    o.token_ids.append(tok)
                    if len(o.token_ids) >= r.max_new_tokens:
                        o.finish_reason, done[i] = "length", True
                delta = trackers[i].update(o.token_ids, final=done[i])
                if trackers[i].stopped:
                    o.finish_reason, done[i] = "stop", True
                o.text = trackers[i].text
                deltas.append(delta)
            if on_step is not None:
                on_step(deltas)
            if all(done):
                break
            step += 1
            nxt = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad), nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                        cache=out.cache, use_cache=True)  # fmt: skip
    finally:
        set_batch_slots(layers, None)
    return outputs
