"""Iteration-level decoding: sequences join and leave the running batch between steps.

``StepDecoder`` owns a ``RowKVCache`` and the sequences in it, and carries out what the
planner (``planner.py``) decided for a step; it decides nothing about admission itself. Each
``step(prefill, decode)`` is at most two forward passes:

1. a decode pass: the given running sequences feed their newest token (one query each);
2. a prefill pass: chunks of the given prompts (the planner bounds them), so a long prompt is
   spread over several steps and never stalls the running rows for long.

Rows for any adapters (and the bare base) share both passes: each row's LoRA slot is set on
the ``MultiLoraLinear`` layers. A sequence leaves the step it finishes and its row is reused
at once. Sampling, stop strings, EOS and the text a client may see follow the rules in
``decode.py`` (one owner); each sequence has its own seeded generator, so a seeded request is
reproducible whatever it is batched with.

Sharing:
- **n rows, one prompt.** A request's rows are admitted together (``admit``); the first
  prefills the prompt, the others wait, and when its last chunk is in, its KV is copied into
  theirs and every row samples its first token from the same logits with its own generator.
- **Prefix cache.** ``admit`` may bring a cached prefix's KV (``prefix_cache.py``): it is
  written into the row and only the rest is prefilled. When a prompt is fully in its row, its
  whole blocks go into the cache (keyed by base, exact adapter version and tokens).
- **Preemption.** ``preempt`` takes a sequence out of the batch, keeping what it decoded: when
  admitted again it prefills its prompt plus those tokens (the last one, not yet fed, is fed by
  the next decode pass) and goes on exactly where it was.

Log-probabilities (``DecodeRow.logprobs`` / ``prompt_logprobs``) come from the raw logits of
the same forward passes (``logprobs.py``): a prefill pass keeps every position's logits only
when a row in it asked for its prompt's.

A forward that raises is run again one row at a time (the writes land in the same places, so
this is safe); a row that still fails ends with ``finish_reason="error"`` and the others go on.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.serving.decode import DecodeRow, RowOutput, TextTracker, choose_tokens, row_generator
from workers.serving.kv import RowKVCache, kv_layout
from workers.serving.logprobs import token_logprobs
from workers.serving.multi_lora import MultiLoraLinear, set_batch_slots
from workers.serving.planner import Running, choose_prefill, kv_positions
from workers.serving.prefix_cache import PrefixCache

LENGTH_QUANTUM = 64  # KV rows grow in steps of this many positions (fewer reallocations)


@dataclass(eq=False)
class Live:
    """A sequence: waiting to be admitted, in the running batch, or ended."""

    row: DecodeRow
    out: RowOutput
    tracker: TextTracker
    gen: Any
    need: int  # prompt + max_new_tokens: the positions it may come to hold
    rid: int = 0
    gid: int = -1  # the admission unit it came in with (the planner preempts by unit)
    context: list[int] = field(default_factory=list)  # tokens to have in the KV before decoding
    index: int = -1  # its row in the cache (-1: not in the batch)
    filled: int = 0  # context tokens already in the cache
    cached: int = 0  # positions already in the cache
    pending: int | None = None  # the newest token, to be fed at the next decode pass
    done: bool = False
    tag: Any = None  # the caller's handle
    leader: Live | None = None  # the row whose prompt KV this one copies (n > 1)
    followers: list[Live] = field(default_factory=list)
    cache_key: tuple[str, bytes] | None = None  # (owner, root) in the prefix cache
    grammar: Any = None  # its ``RowGrammar`` (a constrained row), made when it is created

    @property
    def to_prefill(self) -> int:
        return 0 if self.leader is not None else len(self.context) - self.filled

    @property
    def decoding(self) -> bool:
        """Has a token to feed, its context all in its row (a resumed row prefills first)."""
        return (not self.done and self.pending is not None and self.index >= 0
                and self.filled >= len(self.context))  # fmt: skip


@dataclass
class StepReport:
    """What one step did: text deltas, sequences that ended, the forward passes it ran."""

    deltas: list[tuple[Live, str]] = field(default_factory=list)
    finished: list[Live] = field(default_factory=list)
    forwards: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, rows, slots)
    sampled: list[Live] = field(default_factory=list)  # rows that got a new token
    prefill_tokens: int = 0  # context tokens this step put into the KV by a forward pass


class StepDecoder:
    """Runs sequences to their end, admitting new ones between steps.

    Args:
        model: a causal LM whose attention layers call ``cache.update`` (transformers').
        tokenizer: its tokenizer (EOS, pad, detokenization).
        layers: its ``MultiLoraLinear`` layers ({} for a plain or merged model).
        max_rows: sequences decoded at once at most.
        kv_tokens: KV-cache budget in positions (running rows and the prefix cache together).
        max_len: the model's context: a sequence never holds more positions.
        prefill_chunk: prompt tokens prefilled per step at most.
        prefix_cache: cached prompt prefixes (None: none kept).
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
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if max_rows < 1 or kv_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_rows, kv_tokens and prefill_chunk must be ≥ 1")
        self.model, self.tokenizer, self.layers = model, tokenizer, layers
        self.max_rows, self.kv_tokens, self.max_len = max_rows, kv_tokens, max_len
        self.prefill_chunk = prefill_chunk
        self.cache = prefix_cache
        self.device = next(model.parameters()).device
        config: Any = model.config
        self._dtype = next(model.parameters()).dtype
        self.kv = RowKVCache(int(config.num_hidden_layers), device=self.device,
                             layout=kv_layout(config, self._dtype))  # fmt: skip
        self._additive = getattr(config, "_attn_implementation", "sdpa") == "eager"
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x: use what it takes
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id
        self.eos = tokenizer.eos_token_id
        self.live: list[Live] = []  # by row index: live[i].index == i
        self._ended: list[Live] = []  # ended outside a step (e.g. at creation); reported next
        self._rids = itertools.count()  # ``create`` may run on any thread

    # -- admission -------------------------------------------------------------------------
    def too_big(self, row: DecodeRow, n: int = 1) -> str | None:
        """Why ``n`` rows of ``row`` could never run here (None: they can, given room)."""
        if not row.prompt_ids:
            return "empty prompt"
        if row.max_new_tokens < 0 or (row.max_new_tokens == 0 and row.prompt_logprobs is None):
            return "max_new_tokens must be ≥ 1 (0 only when the prompt's logprobs are asked)"
        need = len(row.prompt_ids) + row.max_new_tokens
        if need > self.max_len:
            return (f"the prompt ({len(row.prompt_ids):,} tokens) plus max_tokens "
                    f"({row.max_new_tokens:,}) exceed the model's context "
                    f"({self.max_len:,} tokens)")  # fmt: skip
        if n > self.max_rows:
            return f"{n} choices need {n} rows; this server decodes {self.max_rows} at once"
        if n * need > self.kv_tokens:
            return (f"the prompt plus max_tokens ({need:,} tokens × {n} choices) exceed this "
                    f"server's KV cache ({self.kv_tokens:,} tokens)")  # fmt: skip
        return None

    def fits(self, row: DecodeRow, also: Sequence[DecodeRow] = ()) -> bool:
        """Whether ``row`` can join now (after ``also``) within ``max_rows`` and the KV budget
        (the prefix cache gives way). The budget counts every row as long as the longest."""
        needs = [s.need for s in self.live] + [len(r.prompt_ids) + r.max_new_tokens
                                                for r in (*also, row)]  # fmt: skip
        return len(needs) <= self.max_rows and kv_positions(needs) <= self.kv_tokens

    def create(self, row: DecodeRow, tag: Any = None) -> Live:
        """A sequence for ``row``, not yet in the batch (``admit`` puts it there). A row whose
        generator cannot be made (a bad seed) comes back ended, failed (``done``, ``out.error``):
        its caller reports it. Touches no state of the decoder: any thread may call it."""
        reason = self.too_big(row)
        if reason is not None:
            raise ValueError(reason)
        out = RowOutput()
        if row.prompt_logprobs is not None:
            out.prompt_logprobs = [None]  # the first token has no context
        seq = Live(row, out, TextTracker(self.tokenizer, row.stop), None,
                   len(row.prompt_ids) + row.max_new_tokens, rid=next(self._rids),
                   context=list(row.prompt_ids), tag=tag)  # fmt: skip
        if row.grammar is not None:
            seq.grammar = row.grammar.row()
        try:
            seq.gen = row_generator(row, self.device)
        except (RuntimeError, ValueError) as exc:  # e.g. a seed out of range: this row only
            out.error, out.finish_reason, seq.done = str(exc), "error", True
        return seq

    def admit(
        self, seqs: Sequence[Live], *, reuse: int = 0, prefix: torch.Tensor | None = None,
        cache_key: tuple[str, bytes] | None = None,
    ) -> None:  # fmt: skip
        """Put ``seqs`` — one request's rows, sharing a prompt — into the batch.

        The first prefills; the others (fresh rows only) copy its prompt's KV when it is in.
        ``prefix``: the KV of the first ``reuse`` context tokens, from the prefix cache.
        ``cache_key``: where the prompt's blocks go in the prefix cache (None: not cached).
        """
        seqs = [s for s in seqs if not s.done]
        if not seqs:
            return
        lead = seqs[0]
        for s in seqs:
            s.index = len(self.live)
            self.live.append(s)
        self._size()
        lead.cache_key = cache_key
        if prefix is not None and reuse > 0:
            self.kv.write(lead.index, 0, prefix[:, :, :, :reuse])
            lead.filled = lead.cached = reuse
        fresh = all(s.pending is None and not s.out.token_ids for s in seqs)
        if fresh:
            for s in seqs[1:]:
                s.leader = lead
                lead.followers.append(s)

    def add(self, row: DecodeRow, tag: Any = None) -> Live:
        """Create and admit one row (check ``fits`` first); prefilled by the next steps."""
        if not self.fits(row):
            raise RuntimeError("no room for this sequence: check fits() first")
        seq = self.create(row, tag)
        if seq.done:
            self._ended.append(seq)  # reported by the next step
        self.admit([seq])
        return seq

    def _size(self) -> None:
        """Size the KV buffers for the running rows: rounded up, within the budget left by the
        prefix cache (which gives way first)."""
        if not self.live:
            self.kv.release()
            return
        rows, longest = len(self.live), max(s.need for s in self.live)
        if rows <= self.kv.rows and longest <= self.kv.length:
            return
        if self.cache is not None:  # the cache gives way to running rows
            over = self.cache.tokens + rows * longest - self.kv_tokens
            if over > 0:
                self.cache.evict(over)
        limit = self.kv_tokens - (self.cache.tokens if self.cache is not None else 0)
        want_rows = min(max(rows, 2 * self.kv.rows), self.max_rows)
        want_len = min(-(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM, self.max_len)
        if want_rows * want_len > limit:
            want_rows = max(rows, min(want_rows, limit // want_len))
        if want_rows * want_len > limit:
            want_len = max(longest, limit // want_rows)
        self.kv.resize(want_rows, want_len)

    def cancel(self, seq: Live) -> None:
        """End ``seq`` now (its caller went away); reported by the next step."""
        if not seq.done:
            seq.done = True
            seq.out.finish_reason = seq.out.finish_reason or "cancelled"

    def preempt(self, seq: Live) -> None:
        """Take ``seq`` out of the batch, keeping what it decoded; ``admit`` it again later."""
        if seq.index < 0:
            return
        self._remove(seq)
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        tokens = seq.out.token_ids
        seq.context = list(seq.row.prompt_ids) + (tokens[:-1] if seq.pending is not None else [])
        seq.filled = seq.cached = 0
        self._size()

    def drop_prefixes(self, owner: str) -> int:
        """Forget every cached prefix of ``owner`` (an exact adapter version, unloaded or
        deleted), and let none of its running rows add more; returns the blocks removed."""
        for s in self.live:
            if s.cache_key is not None and s.cache_key[0] == owner:
                s.cache_key = None
        return self.cache.drop(owner) if self.cache is not None else 0

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

    def running(self) -> list[Running]:
        """The running rows as the planner sees them (namespace and adapter from the tag)."""
        return [Running(s.rid, s.gid if s.gid >= 0 else s.rid, getattr(s.tag, "namespace", ""),
                        getattr(s.tag, "adapter", None), s.need, to_prefill=s.to_prefill,
                        decoding=s.decoding, order=getattr(s.tag, "order", s.rid))
                for s in self.live if not s.done]  # fmt: skip

    # -- one step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, prefill: Sequence[tuple[Live, int]] | None = None,
        decode: Sequence[Live] | None = None,
        on_prefilled: Callable[[StepReport], None] | None = None,
    ) -> StepReport:  # fmt: skip
        """One prefill pass over ``prefill`` chunks, then one decode pass over ``decode`` rows
        (None: chunks chosen by ``planner.choose_prefill``, and every decoding row).

        The prefill pass goes first so that a newcomer's first token does not wait for the
        running rows' pass: ``on_prefilled(report)`` may deliver what it produced (it takes
        the deltas and sampled rows it delivers out of the report) before the decode pass.
        """
        report = StepReport(finished=self._ended)
        self._ended = []
        if decode is None:
            decode = [s for s in self.live if s.decoding]
        if prefill is None:
            by_rid = {s.rid: s for s in self.live}
            chosen = choose_prefill([r for r in self.running() if r.to_prefill > 0],
                                    self.prefill_chunk)  # fmt: skip
            prefill = [(by_rid[rid], n) for rid, n in chosen]
        decoding = [s for s in decode if s.decoding]  # before the prefill makes new ones
        chunks = [(s, n) for s, n in prefill if not s.done and s.index >= 0 and n > 0]
        if chunks:
            seqs = [s for s, _ in chunks]
            tokens = [s.context[s.filled : s.filled + n] for s, n in chunks]
            report.prefill_tokens = sum(n for _, n in chunks)
            starts = [s.filled for s in seqs]
            self._forward("prefill", seqs, tokens, [n for _, n in chunks], report, starts)
            for s, n in chunks:
                if s.done and s.out.finish_reason == "error":
                    continue
                s.filled += n
                s.cached += n
                if s.filled == len(s.context):
                    self._prompt_in(s)
            if on_prefilled is not None and decoding:
                on_prefilled(report)
        if decoding:
            tokens = [[s.pending or 0] for s in decoding]
            self._forward("decode", decoding, tokens, [1] * len(decoding), report)
            for s in decoding:
                if not s.done:
                    s.cached += 1
        self._retire(report)
        return report

    def _prompt_in(self, s: Live) -> None:
        """``s``'s context is all in its row: its followers copy it, the cache keeps it."""
        for f in s.followers:
            self.kv.copy(s.index, f.index, s.cached)
            f.filled = f.cached = s.cached
            f.leader = None
        s.followers = []
        if self.cache is not None and s.cache_key is not None:
            owner, root = s.cache_key
            prompt = s.row.prompt_ids
            self.cache.insert(owner, root, prompt,
                              lambda a, b: self.kv.read(s.index, a, b))  # fmt: skip
            room = self.kv_tokens - self.kv.rows * self.kv.length
            if self.cache.tokens > room:
                self.cache.evict(self.cache.tokens - room)
            s.cache_key = None

    def _forward(
        self, kind: str, seqs: list[Live], tokens: list[list[int]], counts: list[int],
        report: StepReport, starts: list[int] | None = None,
    ) -> None:  # fmt: skip
        """One forward over ``seqs`` (``starts``: a prefill, each row's first context index);
        rows whose last token ends their context (or decode) choose their next token. On an
        exception, each row is run alone."""
        prefill = starts is not None
        want_all = prefill and any(s.row.prompt_logprobs is not None for s in seqs)
        try:
            logits = self._logits(seqs, tokens, counts, all_positions=want_all)
            report.forwards.append((kind, len(seqs), len({s.row.slot for s in seqs})))
        except Exception as exc:  # isolate the row that breaks the forward
            if len(seqs) == 1:
                self._fail(seqs[0], f"the model failed on this request: {exc}", report)
                return
            for i, s in enumerate(seqs):
                self._forward(kind, [s], [tokens[i]], [counts[i]], report,
                              None if starts is None else [starts[i]])  # fmt: skip
            return
        width = logits.shape[1]
        if want_all:
            assert starts is not None
            for i, s in enumerate(seqs):
                if s.row.prompt_logprobs is not None:
                    self._prompt_logprobs(s, logits[i, width - counts[i] :], starts[i])
        last = logits[:, -1, :]
        which = []
        for i, s in enumerate(seqs):
            ends = not prefill or (starts is not None and starts[i] + counts[i] == len(s.context))
            if ends and (not prefill or s.pending is None):  # a resumed row has its next token
                which.append(i)
        if not which:
            return
        rows: list[Live] = []
        index: list[int] = []
        for i in which:
            s = seqs[i]
            if s.row.max_new_tokens == 0:  # echo only: the prompt was all it asked for
                s.out.finish_reason, s.done = "length", True
                for f in s.followers:
                    f.out.prompt_logprobs = list(s.out.prompt_logprobs)
                    f.out.finish_reason, f.done = "length", True
                continue
            rows.append(s)
            index.append(i)
            if prefill:
                for f in s.followers:  # the n rows of one prompt sample from the same logits
                    if not f.done:
                        if f.row.prompt_logprobs is not None:
                            f.out.prompt_logprobs = list(s.out.prompt_logprobs)
                        rows.append(f)
                        index.append(i)
        if rows:
            self._choose(rows, last[index], report)

    def _prompt_logprobs(self, s: Live, logits: torch.Tensor, start: int) -> None:
        """Log-probabilities of the prompt tokens this chunk's logits predict (positions
        ``start + 1 …``), each once (a re-prefill after preemption adds none twice)."""
        prompt, have = s.row.prompt_ids, len(s.out.prompt_logprobs)
        first = max(have, start + 1)
        last = min(start + logits.shape[0], len(prompt) - 1)  # the last predicted position
        if last < first:
            return
        k = s.row.prompt_logprobs or 0
        rows = logits[first - 1 - start : last - start]
        tokens = [prompt[p] for p in range(first, last + 1)]
        s.out.prompt_logprobs.extend(token_logprobs(rows, tokens, [k] * len(tokens)))

    def _logits(self, seqs: list[Live], tokens: list[list[int]], counts: list[int], *,
                all_positions: bool = False) -> torch.Tensor:  # fmt: skip
        """``(rows, positions, vocab)``: the last position only, or (``all_positions``) every
        position of the padded chunk."""
        width = max(counts)
        ids = torch.tensor([[self.pad] * (width - len(t)) + list(t) for t in tokens],
                           dtype=torch.long)  # fmt: skip
        positions, mask = self.kv.begin(
            [s.index for s in seqs], [s.cached for s in seqs], counts,
            additive=self._additive, dtype=self._dtype,
        )  # fmt: skip
        slots = torch.tensor([s.row.slot for s in seqs], device=self.device)
        set_batch_slots(self.layers, slots)
        try:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask,
                             position_ids=positions, use_cache=True,
                             logits_to_keep=0 if all_positions else 1,
                             **{self._cache_kwarg: self.kv})  # fmt: skip
        finally:
            set_batch_slots(self.layers, None)
        return out.logits

    def _choose(self, seqs: list[Live], logits: torch.Tensor, report: StepReport) -> None:
        wants = [i for i, s in enumerate(seqs) if s.row.logprobs is not None]
        raw = logits[wants].clone() if wants else None  # before any change for sampling
        young = [i for i, s in enumerate(seqs) if len(s.out.token_ids) < s.row.min_new_tokens]
        if young and self.eos is not None:
            logits[young, self.eos] = float("-inf")
        for i, s in enumerate(seqs):  # a constrained row: only what its grammar allows next
            if s.grammar is not None and not s.done:
                s.grammar.mask(logits[i])
        rows = [s.row for s in seqs]
        chosen_t, failed = choose_tokens(logits, rows, [s.gen for s in seqs],
                                         [s.done for s in seqs])  # fmt: skip
        chosen = chosen_t.tolist()
        if raw is not None:
            picked = [chosen[i] for i in wants]
            top = [seqs[i].row.logprobs or 0 for i in wants]
            for i, lp in zip(wants, token_logprobs(raw, picked, top), strict=True):
                if not seqs[i].done and i not in failed:
                    seqs[i].out.logprobs.append(lp)
        for i, s in enumerate(seqs):
            if s.done:
                continue
            if i in failed:
                self._fail(s, failed[i], report)
                continue
            tok, o = chosen[i], s.out
            report.sampled.append(s)
            if tok == self.eos or tok in s.row.stop_token_ids:
                o.finish_reason, o.stop_token, s.done = "stop", tok, True
            else:
                o.token_ids.append(tok)
                s.pending = tok
                if s.grammar is not None:
                    s.grammar.advance(tok)
                if s.grammar is not None and s.grammar.finished:
                    o.finish_reason, s.done = "stop", True  # the document is complete
                elif len(o.token_ids) >= s.row.max_new_tokens:
                    o.finish_reason, s.done = "length", True
            if not (s.row.deltas or s.tracker.stop):
                if s.done:  # nobody reads text before the end: decode it once
                    o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
                continue
            delta = s.tracker.update(o.token_ids, final=s.done)
            if s.tracker.stopped:
                o.finish_reason, s.done = "stop", True
            o.text = s.tracker.text
            if delta:
                report.deltas.append((s, delta))

    def _fail(self, seq: Live, why: str, report: StepReport) -> None:
        for s in (seq, *seq.followers):  # rows waiting on its prompt cannot go on either
            s.out.error, s.out.finish_reason, s.done = why, "error", True

    def _remove(self, s: Live) -> None:
        """Take ``s`` out of its row; the last row moves into the freed one. Rows waiting on
        its prompt (it was cancelled before it was in) prefill their own."""
        for f in s.followers:
            f.leader = None
        s.followers = []
        last = self.live[-1]
        if last is not s:
            self.kv.move(last.index, s.index)
            last.index = s.index
            self.live[s.index] = last
        self.live.pop()
        s.index = -1

    def _retire(self, report: StepReport) -> None:
        """Sequences that ended leave; the last row moves into each freed row."""
        ended = [s for s in self.live if s.done]
        for s in ended:
            self._remove(s)
            report.finished.append(s)
        if ended:
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
    seqs: list[Live] = []
    start = 0
    while start < len(rows):  # neighbours with one prompt prefill it once (n samples of it)
        end = start + 1
        while end < len(rows) and list(rows[end].prompt_ids) == list(rows[start].prompt_ids):
            end += 1
        group = [decoder.create(rows[k], tag=k) for k in range(start, end)]
        decoder._ended.extend(s for s in group if s.done)  # reported by the next step
        decoder.admit(group)
        seqs += group
        start = end
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
