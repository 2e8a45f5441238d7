"""The replica's decode loop: one thread that owns the model and carries out plans.

Between steps it turns what it holds — waiting requests, the running rows, the adapter slots,
the prefix cache — into an ``EngineState``, asks ``planner.schedule`` for a ``Plan``, and
carries it out: fails what waited too long for a slot, preempts, takes cached prefixes, loads
adapters into slots (pinned while a row uses them), admits, then runs one step of the
``StepDecoder`` and hands each request its text and, when all its rows have ended, its
outputs. Every decision is the planner's; nothing here chooses.

A request (``Ticket``) is one prompt with ``n`` rows (its choices). ``submit`` takes the
tickets of one API request together, all or none: the queue is bounded overall
(``max_queue``) and per namespace (``max_queue_per_namespace``), so a namespace that floods
gets ``Overloaded`` (the HTTP layer answers 429) for itself while others are still queued.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workers.serving.decode import DecodeRow, RowOutput
from workers.serving.logprobs import TokenLogprob
from workers.serving.multi_lora import BASE_SLOT
from workers.serving.planner import Budget, EngineState, Plan, SlotState, Waiting, schedule
from workers.serving.slots import AdapterSlots, NoFreeSlot
from workers.serving.stepper import Live, StepDecoder, StepReport

log = logging.getLogger(__name__)

DeltaFn = Callable[[int, str, list[TokenLogprob]], None]  # (choice, new text, new logprobs)
DoneFn = Callable[[list[RowOutput], tuple[str, str] | None], None]


class Overloaded(RuntimeError):
    """The request queue is full (overall, or for the caller's namespace): try again later."""


@dataclass(eq=False)
class Ticket:
    """One prompt handed to the loop with its ``n`` rows, and the callbacks for its answer.

    ``on_delta(choice, text, logprobs)`` is called for new text or new token log-probabilities
    of a row; ``on_done(outputs, error)`` once, when every row has ended, with
    ``error = (message, kind)`` when the request failed. Both run on the loop thread and must
    not block.
    """

    rows: list[DecodeRow]  # one per choice: the same prompt, each its own seed
    on_delta: DeltaFn | None
    on_done: DoneFn
    adapter: str | None = None  # slot key (exact version); None: the base
    load: Callable[[int], None] | None = None  # fills a slot with the adapter
    namespace: str = ""  # the tenant it counts against
    cache_root: bytes | None = None  # its prefix-cache chain (None: never cached)
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    seqs: list[Live] = field(default_factory=list)
    gid: int = -1
    order: int = -1
    first_choice: int = 0  # the choice index of its first row in the API response
    delivered: bool = False
    _sent: dict[int, int] = field(default_factory=dict)  # rid -> logprobs delivered

    @property
    def row(self) -> DecodeRow:
        return self.rows[0]


@dataclass
class LoopStats:
    steps: int = 0
    forwards: int = 0
    rows: int = 0  # rows summed over forwards
    max_rows: int = 0
    max_adapters: int = 0  # most distinct slots (the base counted as one) in one forward
    admitted: int = 0
    rejected: int = 0  # refused with Overloaded
    preempted: int = 0
    waiting: int = 0
    running: int = 0
    namespaces: dict[str, dict[str, int]] = field(default_factory=dict)  # waiting / running


@dataclass(frozen=True)
class TenantLimits:
    """Per-namespace caps (None: none below the replica's own)."""

    max_queue: int | None = None  # prompts waiting
    max_rows: int | None = None  # rows running
    max_slots: int | None = None  # adapter slots pinned
    max_kv_tokens: int | None = None  # KV positions its running rows may come to hold


@dataclass(eq=False)
class _Unit:
    """Rows admitted together: a fresh request's n rows, or one preempted row."""

    gid: int
    ticket: Ticket
    seqs: list[Live]


class DecodeLoop:
    """Plans, admits, steps and delivers; ``submit`` and ``cancel`` may be called from any
    thread."""

    def __init__(
        self,
        decoder: StepDecoder,
        slots: AdapterSlots | None = None,
        *,
        max_queue: int = 1024,
        tenants: TenantLimits | None = None,
        slot_wait_s: float = 30.0,
        name: str = "lorafleet-decode",
    ) -> None:
        self.decoder, self.slots = decoder, slots
        self.max_queue, self.slot_wait_s = max_queue, slot_wait_s
        self.tenants = tenants or TenantLimits()
        self.stats = LoopStats()
        self._units: dict[int, _Unit] = {}  # waiting, by gid
        self._queued: Counter[str] = Counter()  # prompts waiting per namespace (fresh only)
        self._running: dict[int, Ticket] = {}  # rid -> ticket of admitted rows
        self._unit_ids = itertools.count()
        self._commands: list[Callable[[], object]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------
    def submit(self, tickets: Sequence[Ticket]) -> None:
        """Queue ``tickets`` (one API request's prompts), all or none.

        Raises:
            ValueError: a request that can never run here (too long for the context or the
                budget, more choices than rows).
            Overloaded: the queue is full overall or for the tickets' namespace.
        """
        for t in tickets:
            reason = self.decoder.too_big(t.row, len(t.rows))
            if reason is not None:
                raise ValueError(reason)
            cap = self.tenants.max_rows
            if cap is not None and len(t.rows) > cap:
                raise ValueError(f"{len(t.rows)} choices; a namespace runs {cap} rows at most")
        seqs = [[self.decoder.create(r, t) for r in t.rows] for t in tickets]
        for row_seqs in seqs:
            for seq in row_seqs:
                if seq.done:  # e.g. a seed its generator refuses: the request is refused
                    raise ValueError(seq.out.error or "this request cannot be decoded")
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            waiting = sum(self._queued.values())
            by_ns = Counter(t.namespace for t in tickets)
            cap = self.tenants.max_queue
            for ns, k in by_ns.items():
                if cap is not None and self._queued[ns] + k > cap:
                    self.stats.rejected += 1
                    raise Overloaded(f"namespace {ns or '(admin)'} has {self._queued[ns]} "
                                     "requests waiting; try again shortly")  # fmt: skip
            if waiting + len(tickets) > self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(f"{waiting} requests are waiting; try again shortly")
            for t, s in zip(tickets, seqs, strict=True):
                t.seqs, t.gid = s, next(self._unit_ids)
                t.order = t.gid
                self._units[t.gid] = _Unit(t.gid, t, list(s))
                self._queued[t.namespace] += 1
            self.stats.waiting = sum(len(u.seqs) for u in self._units.values())
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The caller went away: stop decoding ``ticket`` at the next step."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    def call_soon(self, command: Callable[[], object]) -> None:
        """Run ``command`` on the loop thread between steps (it owns the prefix cache)."""
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the loop thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._closed and not self._units and not self._commands
                       and self.decoder.idle):  # fmt: skip
                    self._cond.wait()
                if self._closed:
                    return
                commands, self._commands = self._commands, []
                self._drop_cancelled()
                state = self._state()
            for command in commands:
                try:
                    command()
                except Exception:  # a command must never stop the loop
                    log.exception("a decode-loop command failed")
            plan = schedule(state, self._budget())
            with self._cond:
                admitted = self._carry_out(plan)
            if self.decoder.idle:
                if not admitted:  # waiting for slots or room only: do not spin
                    with self._cond:
                        self._cond.wait(timeout=0.01)
                continue
            by_rid = {s.rid: s for s in self.decoder.live}
            prefill = [(by_rid[rid], n) for rid, n in plan.prefill if rid in by_rid]
            decode = [by_rid[rid] for rid in plan.decode if rid in by_rid]
            try:
                report = self.decoder.step(prefill, decode, self._early)
            except Exception:  # never let the loop die: fail what was running, go on
                log.exception("decode step failed")
                for seq in self.decoder.reset():
                    seq.out.error = "the decode step failed"
                    seq.out.finish_reason, seq.done = "error", True
                    self._finished(seq)
                continue
            self._account(report.forwards)
            self._deliver_deltas(report.deltas, report.sampled)
            for seq in report.finished:
                self._finished(seq)

    def _budget(self) -> Budget:
        d, t = self.decoder, self.tenants
        return Budget(max_rows=d.max_rows, kv_tokens=d.kv_tokens, prefill_chunk=d.prefill_chunk,
                      rows_per_namespace=t.max_rows, kv_per_namespace=t.max_kv_tokens,
                      slots_per_namespace=t.max_slots, slot_wait_s=self.slot_wait_s)  # fmt: skip

    def _state(self) -> EngineState:
        """What the planner sees (called with the lock held)."""
        now = time.monotonic()
        cache = self.decoder.cache
        waiting = []
        for u in self._units.values():
            lead, t = u.seqs[0], u.ticket
            reuse = 0
            if cache is not None and t.cache_root is not None and lead.row.prompt_logprobs is None:
                reuse = cache.peek(t.cache_root, lead.context)
            waiting.append(Waiting(u.gid, tuple(s.rid for s in u.seqs), t.namespace, t.adapter,
                                   lead.need, len(lead.context), reuse, t.order,
                                   now - t.queued_at))  # fmt: skip
        slots = None
        if self.slots is not None:
            slots = SlotState(self.slots.n, frozenset(self.slots.resident()),
                              frozenset(self.slots.loading()), self.slots.free())  # fmt: skip
        return EngineState(waiting, self.decoder.running(), slots,
                           cache.tokens if cache is not None else 0)  # fmt: skip

    def _drop_cancelled(self) -> None:
        for gid, u in list(self._units.items()):
            if u.ticket.cancelled:
                del self._units[gid]
                if self._fresh(u):
                    self._queued[u.ticket.namespace] -= 1
                for s in u.seqs:
                    s.done = True
                    s.out.finish_reason = s.out.finish_reason or "cancelled"
                    self._finished(s)
        for seq in self.decoder.live:
            ticket = self._running.get(seq.rid)
            if ticket is not None and ticket.cancelled:
                self.decoder.cancel(seq)

    @staticmethod
    def _fresh(u: _Unit) -> bool:
        return u.gid == u.ticket.gid

    def _carry_out(self, plan: Plan) -> bool:
        """Fail, preempt, evict, admit (called with the lock held); whether any was admitted."""
        for gid, message, kind in plan.fail:
            u = self._units.pop(gid, None)
            if u is None:
                continue
            if self._fresh(u):
                self._queued[u.ticket.namespace] -= 1
            self._fail_ticket(u.ticket, message, kind)
        for gid in plan.preempt:
            for seq in [s for s in self.decoder.live if s.gid == gid and not s.done]:
                ticket = self._running.pop(seq.rid)
                self.decoder.preempt(seq)
                self._release(ticket, seq)
                unit = _Unit(next(self._unit_ids), ticket, [seq])
                self._units[unit.gid] = unit
                self.stats.preempted += 1
        cache = self.decoder.cache
        taken: dict[int, tuple[int, torch.Tensor | None]] = {}
        for a in plan.admit:  # take the cached prefixes before the cache makes room
            u = self._units.get(a.gid)
            if u is None or cache is None or a.reuse <= 0 or not _reusable(u):
                continue
            n, kv = cache.take(u.ticket.cache_root, u.seqs[0].context)  # type: ignore[arg-type]
            if n >= a.reuse:
                taken[a.gid] = (a.reuse, kv)
        if cache is not None and plan.evict_cache_tokens:
            cache.evict(plan.evict_cache_tokens)
        admitted = False
        for a in plan.admit:
            u = self._units.get(a.gid)
            if u is None:
                continue
            t = u.ticket
            if t.adapter is not None and self.slots is not None:
                try:
                    assert t.load is not None
                    slot = self.slots.acquire(t.adapter, t.load)
                except NoFreeSlot:
                    continue  # another caller took the slot since the plan: next step
                except Exception as exc:  # its load failed: this request only
                    del self._units[a.gid]
                    if self._fresh(u):
                        self._queued[t.namespace] -= 1
                    log.warning("loading %s into a slot failed: %s", t.adapter, exc)
                    self._fail_ticket(t, "the adapter could not be loaded", "internal")
                    continue
                for _ in u.seqs[1:]:
                    self.slots.acquire(t.adapter, t.load)  # one pin per row
                for s in u.seqs:
                    s.row = _with_slot(s.row, slot)
            del self._units[a.gid]
            if self._fresh(u):
                self._queued[t.namespace] -= 1
            reuse, kv = taken.get(a.gid, (0, None))
            if cache is not None and reuse == 0 and _reusable(u):
                cache.miss(len(u.seqs[0].context))
            key = (t.adapter or "", t.cache_root) if t.cache_root is not None else None
            for s in u.seqs:
                s.gid = a.gid
                self._running[s.rid] = t
            self.decoder.admit(u.seqs, reuse=reuse, prefix=kv, cache_key=key)
            self.stats.admitted += 1
            admitted = True
        self.stats.waiting = sum(len(u.seqs) for u in self._units.values())
        self.stats.running = len(self.decoder.live)
        return admitted

    def _release(self, ticket: Ticket, seq: Live) -> None:
        if ticket.adapter is not None and self.slots is not None and seq.row.slot != BASE_SLOT:
            self.slots.release(seq.row.slot)

    def _finished(self, seq: Live) -> None:
        ticket = seq.tag
        if self._running.pop(seq.rid, None) is not None:
            self._release(ticket, seq)
        if not ticket.delivered and all(
            s.done and s.index < 0 and s.rid not in self._running for s in ticket.seqs
        ):
            ticket.delivered = True
            outs = [s.out for s in ticket.seqs]
            failed = next((o.error for o in outs if o.error is not None), None)
            self._deliver(ticket, outs, (failed, "internal") if failed is not None else None)
        self.stats.running = len(self.decoder.live)

    def _fail_ticket(self, ticket: Ticket, message: str, kind: str) -> None:
        for s in ticket.seqs:
            s.done = True
        ticket.delivered = True
        self._deliver(ticket, [s.out for s in ticket.seqs], (message, kind))

    def _deliver(self, ticket: Ticket, outs: list[RowOutput],
                 error: tuple[str, str] | None) -> None:  # fmt: skip
        try:
            ticket.on_done(outs, error)
        except Exception:  # a broken callback must not stop the loop
            log.exception("delivering a result failed")

    def _deliver_deltas(self, deltas: list[tuple[Live, str]], sampled: list[Live]) -> None:
        text = {id(s): d for s, d in deltas}
        for s in {id(s): s for s in [*sampled, *(s for s, _ in deltas)]}.values():
            ticket: Ticket = s.tag
            if ticket.on_delta is None:
                continue
            sent = ticket._sent.get(s.rid, 0)
            new = s.out.logprobs[sent:]
            delta = text.get(id(s), "")
            if not delta and not new:
                continue
            ticket._sent[s.rid] = len(s.out.logprobs)
            try:
                ticket.on_delta(ticket.first_choice + ticket.seqs.index(s), delta, new)
            except Exception:
                log.exception("delivering a delta failed")

    def _early(self, report: StepReport) -> None:
        """Deliver what a step's prefill pass produced (newcomers' first tokens) before its
        decode pass runs."""
        self._deliver_deltas(report.deltas, report.sampled)
        report.deltas, report.sampled = [], []

    def _account(self, forwards: list[tuple[str, int, int]]) -> None:
        s = self.stats
        s.steps += 1
        for _, rows, adapters in forwards:
            s.forwards += 1
            s.rows += rows
            s.max_rows = max(s.max_rows, rows)
            s.max_adapters = max(s.max_adapters, adapters)


def _with_slot(row: DecodeRow, slot: int) -> DecodeRow:
    return dataclasses.replace(row, slot=slot)


def _reusable(u: _Unit) -> bool:
    """Whether a unit may take a cached prefix (a row that reports its prompt's
    log-probabilities computes every position)."""
    return u.ticket.cache_root is not None and u.seqs[0].row.prompt_logprobs is None
