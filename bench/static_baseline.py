"""The baseline of ``bench/serving.py``: the static batcher the replica used before.

A batch forms from whatever waits (up to ``max_rows``) when the previous batch has ended, and
decodes until its longest row ends: rows that finished early keep their place (fed padding)
and newcomers wait for the whole batch. The decode loop is the previous engine's, kept here
verbatim in its logic (left-padded prompts, a transformers ``DynamicCache``), so the
comparison is against what users had, on the same model and the same sampling rules.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from workers.serving.decode import DecodeRow, RowOutput, TextTracker, choose_tokens, row_generator
from workers.serving.multi_lora import MultiLoraLinear, set_batch_slots


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
            gens.append(row_generator(r, device))
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
            nxt, failed = choose_tokens(logits, rows, gens, done)
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


class StaticServer:
    """Requests queue; when a batch ends, the next one takes up to ``max_rows`` of them."""

    def __init__(self, model: nn.Module, tokenizer: Any, layers: dict[str, MultiLoraLinear],
                 *, max_rows: int = 32) -> None:  # fmt: skip
        self.model, self.tokenizer, self.layers, self.max_rows = model, tokenizer, layers, max_rows
        self._queue: deque[tuple[DecodeRow, Callable[[str], None], Callable[[Any], None]]]
        self._queue = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, row: DecodeRow, on_delta: Callable[[str], None],
               on_done: Callable[[Any], None]) -> None:  # fmt: skip
        with self._cond:
            self._queue.append((row, on_delta, on_done))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(self.max_rows, len(self._queue)))]

            def on_step(deltas: list[str | None], batch: Sequence[Any] = batch) -> None:
                for (_, on_delta, _), d in zip(batch, deltas, strict=True):
                    if d:
                        on_delta(d)

            outs = decode_batch(self.model, self.tokenizer, self.layers, [b[0] for b in batch],
                                on_step=on_step)  # fmt: skip
            for (_, _, on_done), out in zip(batch, outs, strict=True):
                on_done(out)
