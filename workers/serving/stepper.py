"""Iteration-level decoding: sequences join and leave the running batch between steps.

``StepDecoder`` owns a ``RowKVCache`` and the sequences in it. Each ``step()`` is at most two
forward passes:

1. a decode pass: every running sequence feeds its newest token (one query each);
2. a prefill pass: newly admitted prompts, a chunk of at most ``prefill_chunk`` tokens in all,
   so a long prompt is spread over several steps and never stalls the running rows for long.

Rows for any adapters (and the bare base) share both passes: each row's LoRA slot is set on
the ``MultiLoraLinear`` layers. A sequence leaves the step it finishes and its row is reused
at once. Sampling, stop strings, EOS and the text a client may see follow the rules in
``decode.py`` (one owner); each sequence has its own seeded generator, so a seeded request is
reproducible whatever it is batched with.

A forward that raises is run again one row at a time (the writes land in the same places, so
this is safe); a row that still fails ends with ``finish_reason="error"`` and the others go on.

Admission is the caller's decision through ``fits``: the KV buffers hold ``rows × length``
positions, never more than ``kv_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.serving.decode import DecodeRow, RowOutput, TextTracker, choose_tokens, row_generator
from workers.serving.kv import RowKVCache
from workers.serving.multi_lora import MultiLoraLinear, set_batch_slots

LENGTH_QUANTUM = 64  # KV rows grow in steps of this many positions (fewer reallocations)


@dataclass(eq=False)
class Live:
    """A sequence in the running batch."""

    row: DecodeRow
    out: RowOutput
    tracker: TextTracker
    gen: Any
    need: int  # prompt + max_new_tokens: the positions it may come to hold
    index: int = -1  # its row in the cache
    filled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # positions already in the cache
    pending: int | None = None  # the newest token, to be fed at the next decode pass
    done: bool = False
    tag: Any = None  # the caller's handle


@dataclass
class StepReport:
    """What one step did: text deltas, sequences that ended, the forward passes it ran."""

    deltas: list[tuple[Live, str]] = field(default_factory=list)
    finished: list[Live] = field(default_factory=list)
    forwards: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, rows, slots)


class StepDecoder:
    """Runs sequences to their end, admitting new ones between steps.

    Args:
        model: a causal LM whose attention layers call ``cache.update`` (transformers').
        tokenizer: its tokenizer (EOS, pad, detokenization).
        layers: its ``MultiLoraLinear`` layers ({} for a plain or merged model).
        max_rows: sequences decoded at once at most.
        kv_tokens: KV-cache budget in positions (all rows together).
        max_len: the model's context: a sequence never holds more positions.
        prefill_chunk: prompt tokens prefilled per step at most.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layers: dict[str, MultiLoraLinear],
        *,
        max_rows: int = 32,
        kv_tokens: int = 1 << 16,
        max_len: int = 1 << 30,
        prefill_chunk: int = 256,
    ) -> None:
        if max_rows < 1 or kv_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_rows, kv_tokens and prefill_chunk must be ≥ 1")
        self.model, self.tokenizer, self.layers = model, tokenizer, layers
        self.max_rows, self.kv_tokens, self.max_len = max_rows, kv_tokens, max_len
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        config: Any = model.config
        self.kv = RowKVCache(int(config.num_hidden_layers), device=self.device)
        self._additive = getattr(config, "_attn_implementation", "sdpa") == "eager"
        self._dtype = next(model.parameters()).dtype
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id
        self.eos = tokenizer.eos_token_id
        self.live: list[Live] = []  # by row index: live[i].index == i
        self._ended: list[Live] = []  # ended before entering the cache

    # -- admission -------------------------------------------------------------------------
    def too_big(self, row: DecodeRow) -> str | None:
        """Why ``row`` could never run here (None: it can, once there is room)."""
        if not row.prompt_ids:
            return "empty prompt"
        if row.max_new_tokens < 1:
            return "max_new_tokens must be ≥ 1"
        need = len(row.prompt_ids) + row.max_new_tokens
        if need > self.max_len:
            return (f"the prompt ({len(row.prompt_ids):,} tokens) plus max_tokens "
                    f"({row.max_new_tokens:,}) exceed the model's context "
                    f"({self.max_len:,} tokens)")  # fmt: skip
        if need > self.kv_tokens:
            return (f"the prompt plus max_tokens ({need:,} tokens) exceed this server's KV "
                    f"cache ({self.kv_tokens:,} tokens)")  # fmt: skip
        return None

    def fits(self, row: DecodeRow, also: Sequence[DecodeRow] = ()) -> bool:
        """Whether ``row`` can join now (after ``also``) within ``max_rows`` and the KV budget.

        The budget counts what the buffers will hold: every row as long as the longest.
        """
        needs = [s.need for s in self.live] + [len(r.prompt_ids) + r.max_new_tokens for r in also]
        rows = len(needs) + 1
        longest = max([len(row.prompt_ids) + row.max_new_tokens, *needs])
        return rows <= self.max_rows and rows * longest <= self.kv_tokens

    def add(self, row: DecodeRow, tag: Any = None) -> Live:
        """Admit ``row`` (check ``fits`` first); its prompt is prefilled by the next steps."""
        reason = self.too_big(row)
        if reason is not None:
            raise ValueError(reason)
        if not self.fits(row):
            raise RuntimeError("no room for this sequence: check fits() first")
        out = RowOutput()
        seq = Live(row, out, TextTracker(self.tokenizer, row.stop), None,
                   len(row.prompt_ids) + row.max_new_tokens, tag=tag)  # fmt: skip
        try:
            seq.gen = row_generator(row, self.device)
        except (RuntimeError, ValueError) as exc:  # e.g. a seed out of range: this row only
            out.error, out.finish_reason, seq.done = str(exc), "error", True
            self._ended.append(seq)  # never enters the cache; the next step reports it
            return seq
        seq.index = len(self.live)
        self.live.append(seq)
        self._size()
        return seq

    def _size(self) -> None:
        """Size the KV buffers for the running rows: rounded up, never past the budget."""
        if not self.live:
            self.kv.release()
            return
        rows, longest = len(self.live), max(s.need for s in self.live)
        if rows <= self.kv.rows and longest <= self.kv.length:
            return
        want_rows = min(max(rows, 2 * self.kv.rows), self.max_rows)
        want_len = min(-(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM, self.max_len)
        if want_rows * want_len > self.kv_tokens:
            want_rows = max(rows, min(want_rows, self.kv_tokens // want_len))
        if want_rows * want_len > self.kv_tokens:
            want_len = max(longest, self.kv_tokens // want_rows)
        self.kv.resize(want_rows, want_len)

    def cancel(self, seq: Live) -> None:
        """End ``seq`` now (its caller went away); reported by the next step."""
        if not seq.done:
            seq.done = True
            seq.out.finish_reason = seq.out.finish_reason or "cancelled"

    def reset(self) -> list[Live]:
        """Drop every sequence and the KV buffers (after a failure the loop cannot explain);
        returns the sequences dropped."""
        dropped = self.live + self._ended
        self.live, self._ended = [], []
        self.kv.release()
        return dropped

    @property
    def idle(self) -> bool:
        return not self.live and not self._ended

    # -- one step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepReport:
        """One decode pass over the running rows and one prefill chunk for new prompts."""
        report = StepReport(finished=self._ended)
        self._ended = []
        decoding = [s for s in self.live if not s.done and s.pending is not None]
        if decoding:
            counts = [1] * len(decoding)
            tokens = [[s.pending or 0] for s in decoding]
            self._forward("decode", decoding, tokens, counts, report)
            for s in decoding:
                if not s.done:
                    s.cached += 1
        prefill: list[tuple[Live, int]] = []
        budget, width = self.prefill_chunk, 0
        for s in self.live:
            if budget <= 0:
                break
            if not s.done and s.filled < len(s.row.prompt_ids):
                n = min(len(s.row.prompt_ids) - s.filled, budget)
                if prefill and (len(prefill) + 1) * max(width, n) > 2 * self.prefill_chunk:
                    break  # rows are padded to the longest chunk: bound the padded work too
                prefill.append((s, n))
                budget -= n
                width = max(width, n)
        if prefill:
            seqs = [s for s, _ in prefill]
            tokens = [list(s.row.prompt_ids[s.filled : s.filled + n]) for s, n in prefill]
            ready = [s.filled + n == len(s.row.prompt_ids) for s, n in prefill]
            self._forward("prefill", seqs, tokens, [n for _, n in prefill], report, ready)
            for s, n in prefill:
                s.filled += n
                s.cached += n
        self._retire(report)
        return report

    def _forward(
        self, kind: str, seqs: list[Live], tokens: list[list[int]], counts: list[int],
        report: StepReport, sample: list[bool] | None = None,
    ) -> None:  # fmt: skip
        """One forward over ``seqs``; rows whose last token ends their prompt (or decode)
        choose their next token. On an exception, each row is run alone."""
        try:
            logits = self._logits(seqs, tokens, counts)
            report.forwards.append((kind, len(seqs), len({s.row.slot for s in seqs})))
        except Exception as exc:  # isolate the row that breaks the forward
            if len(seqs) == 1:
                self._fail(seqs[0], f"the model failed on this request: {exc}", report)
                return
            for i, s in enumerate(seqs):
                self._forward(kind, [s], [tokens[i]], [counts[i]], report,
                              None if sample is None else [sample[i]])  # fmt: skip
            return
        which = [i for i in range(len(seqs)) if sample is None or sample[i]]
        if which:
            self._choose([seqs[i] for i in which], logits[which], report)

    def _logits(self, seqs: list[Live], tokens: list[list[int]], counts: list[int]) -> torch.Tensor:
        width = max(counts)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        for i, toks in enumerate(tokens):
            ids[i, width - len(toks) :] = torch.tensor(toks, dtype=torch.long)
        positions, mask = self.kv.begin(
            [s.index for s in seqs], [s.cached for s in seqs], counts,
            additive=self._additive, dtype=self._dtype,
        )  # fmt: skip
        slots = torch.tensor([s.row.slot for s in seqs], device=self.device)
        set_batch_slots(self.layers, slots)
        try:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask,
                             position_ids=positions, cache=self.kv, use_cache=True,
                             logits_to_keep=1)  # fmt: skip
        finally:
            set_batch_slots(self.layers, None)
        return out.logits[:, -1, :]

    def _choose(self, seqs: list[Live], logits: torch.Tensor, report: StepReport) -> None:
        rows = [s.row for s in seqs]
        for i, s in enumerate(seqs):
            if len(s.out.token_ids) < s.row.min_new_tokens and self.eos is not None:
                logits[i, self.eos] = float("-inf")
        chosen, failed = choose_tokens(logits, rows, [s.gen for s in seqs],
                                       [s.done for s in seqs])  # fmt: skip
        for i, s in enumerate(seqs):
            if s.done:
                continue
            if i in failed:
                self._fail(s, failed[i], report)
                continue
            tok, o = int(chosen[i]), s.out
            if tok == self.eos:
                o.finish_reason, s.done = "stop", True
            else:
                o.token_ids.append(tok)
                s.pending = tok
                if len(o.token_ids) >= s.row.max_new_tokens:
                    o.finish_reason, s.done = "length", True
            delta = s.tracker.update(o.token_ids, final=s.done)
            if s.tracker.stopped:
                o.finish_reason, s.done = "stop", True
            o.text = s.tracker.text
            if delta:
                report.deltas.append((s, delta))

    def _fail(self, seq: Live, why: str, report: StepReport) -> None:
        seq.out.error, seq.out.finish_reason, seq.done = why, "error", True

    def _retire(self, report: StepReport) -> None:
        """Sequences that ended leave; the last row moves into each freed row."""
        for s in [s for s in self.live if s.done]:
            last = self.live[-1]
            if last is not s:
                self.kv.move(last.index, s.index)
                last.index = s.index
                self.live[s.index] = last
            self.live.pop()
            s.index = -1
            report.finished.append(s)
        if report.finished:
            self._size()


def decode_batch(
    model: nn.Module,
    tokenizer: Any,
    layers: dict[str, MultiLoraLinear],
    rows: list[DecodeRow],
    *,
    on_step: Callable[[list[str | None]], None] | None = None,
) -> list[RowOutput]:
    """Decode ``rows`` as one batch (all admitted at once, none later) to their end.

    ``on_step`` gets one text delta per row per step (``None``: nothing new). Invalid rows
    (empty prompt, ``max_new_tokens`` < 1) raise ``ValueError``.
    """
    if not rows:
        return []
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in rows)
    decoder = StepDecoder(model, tokenizer, layers, max_rows=len(rows),
                          kv_tokens=len(rows) * longest)  # fmt: skip
    seqs = [decoder.add(row, tag=i) for i, row in enumerate(rows)]
    pending = {id(s) for s in seqs if not s.done}
    while pending:
        report = decoder.step()
        if on_step is not None:
            deltas: list[str | None] = [None] * len(rows)
            for s, d in report.deltas:
                deltas[s.tag] = d
            on_step(deltas)
        for s in report.finished:
            pending.discard(id(s))
    return [s.out for s in seqs]
