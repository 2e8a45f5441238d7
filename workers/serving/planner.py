"""The serving scheduler's decision: ``schedule(state, budget) -> Plan``, a pure function.

The policy, once per engine step:

1. **Fair admission.** Waiting requests are taken namespace by namespace: the next one comes
   from the namespace with the fewest rows running (ties: the earliest arrival), so a
   namespace that floods the replica is served after one that sends a single request, and
   every namespace is first-come-first-served within itself. A request takes ``n`` rows (its
   choices) at once.
2. **Caps per namespace.** No namespace holds more than ``rows_per_namespace`` rows,
   ``kv_per_namespace`` KV positions or ``slots_per_namespace`` adapter slots; a namespace at
   a cap waits for itself and nobody else does.
3. **The budget.** The rows' KV buffers hold ``rows × longest`` positions (``kv.py``): an
   admission must keep that within ``kv_tokens``, with the prefix cache giving way (its least
   recently used blocks are evicted). When a request does not fit it stops admission (nobody
   overtakes it), unless its namespace holds less than its fair share (``max_rows`` / active
   namespaces): then the newest requests of namespaces above their share are preempted (their
   KV is dropped and they are prefilled again later, keeping what they decoded), but never
   below that share. Adapter slots are shared the same way: all slots pinned by one
   namespace's running requests give way to a namespace below its share of slots.
4. **Prefill and decode.** Every running row that has a token to feed decodes. Prompts are
   prefilled at most ``prefill_chunk`` tokens per step (padded work at most twice that),
   interleaved across namespaces; a prompt's cached prefix is not prefilled again, and a
   request's ``n`` rows prefill once (its first row; the others copy its KV).

The engine's decode loop gathers the state, calls this, and carries the plan out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    """A request waiting for admission: ``len(rids)`` rows that share one prompt."""

    gid: int
    rids: tuple[int, ...]  # its rows; the first prefills, the others copy its prompt's KV
    namespace: str
    adapter: str | None  # the exact version (slot key); None: the bare base
    need: int  # KV positions each row may come to hold (context + new tokens)
    prefill: int  # context tokens to put in the KV before its first new token
    reusable: int = 0  # leading context tokens the prefix cache holds for it
    order: int = 0  # arrival order (smaller: earlier)
    waited_s: float = 0.0


@dataclass(frozen=True)
class Running:
    """A row in the running batch."""

    rid: int
    gid: int
    namespace: str
    adapter: str | None
    need: int
    to_prefill: int = 0  # context tokens not in the KV yet (0 for rows of n > 1 but the first)
    decoding: bool = False  # has a token to feed at the next decode pass
    order: int = 0  # its request's arrival order: preemption takes the newest first


@dataclass(frozen=True)
class SlotState:
    """The replica's adapter slots: ``n`` slots, the adapters in them, those loading."""

    n: int
    resident: frozenset[str] = frozenset()
    busy: frozenset[str] = frozenset()  # pinned by something else than a running row
    free: int | None = None  # slots holding nothing (None: n minus resident and busy)


@dataclass(frozen=True)
class EngineState:
    waiting: Sequence[Waiting]
    running: Sequence[Running]
    slots: SlotState | None = None  # None: a replica without adapter slots (merged, plain)
    cache_tokens: int = 0  # KV positions the prefix cache holds


@dataclass(frozen=True)
class Budget:
    max_rows: int
    kv_tokens: int
    prefill_chunk: int = 256
    rows_per_namespace: int | None = None  # None: no cap below max_rows
    kv_per_namespace: int | None = None
    slots_per_namespace: int | None = None
    slot_wait_s: float = 30.0


@dataclass(frozen=True)
class Admit:
    gid: int
    reuse: int  # prefix-cache tokens it takes (its first row prefills the rest)


@dataclass
class Plan:
    """What one step does, in this order: fail, preempt, evict, admit, then one forward of
    ``decode`` rows and one of ``prefill`` chunks."""

    admit: list[Admit] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)  # (rid, tokens)
    decode: list[int] = field(default_factory=list)  # rids
    preempt: list[int] = field(default_factory=list)  # gids: every running row of the group
    evict_cache_tokens: int = 0
    fail: list[tuple[int, str, str]] = field(default_factory=list)  # (gid, message, kind)

    @property
    def idle(self) -> bool:
        return not (self.admit or self.prefill or self.decode or self.preempt or self.fail)


def kv_positions(needs: Iterable[int]) -> int:
    """KV positions the row buffers hold for rows of these needs: rows × the longest."""
    values = list(needs)
    return len(values) * max(values) if values else 0


class _Book:
    """Running rows as the plan changes them (admitted and preempted rows counted)."""

    def __init__(self, rows: Iterable[Running] = ()) -> None:
        self.rows: dict[int, Running] = {}
        self.ns_rows: Counter[str] = Counter()
        self.ns_kv: Counter[str] = Counter()
        for r in rows:
            self.add(r)

    def copy(self) -> _Book:
        return _Book(self.rows.values())

    def needs(self) -> list[int]:
        return [r.need for r in self.rows.values()]

    def fits(self, w: Waiting, budget: Budget) -> bool:
        needs = self.needs() + [w.need] * len(w.rids)
        return len(needs) <= budget.max_rows and kv_positions(needs) <= budget.kv_tokens

    def adapters_of(self, namespace: str) -> set[str]:
        return {r.adapter for r in self.rows.values()
                if r.namespace == namespace and r.adapter is not None}  # fmt: skip

    def pinned(self) -> set[str]:
        return {r.adapter for r in self.rows.values() if r.adapter is not None}

    def groups(self) -> dict[int, list[Running]]:
        out: dict[int, list[Running]] = defaultdict(list)
        for r in self.rows.values():
            out[r.gid].append(r)
        return out

    def add(self, row: Running) -> None:
        self.rows[row.rid] = row
        self.ns_rows[row.namespace] += 1
        self.ns_kv[row.namespace] += row.need

    def remove_group(self, gid: int) -> None:
        for r in [r for r in self.rows.values() if r.gid == gid]:
            del self.rows[r.rid]
            self.ns_rows[r.namespace] -= 1
            self.ns_kv[r.namespace] -= r.need


def _row_victims(book: _Book, w: Waiting, share: int, budget: Budget,
                 protected: set[int]) -> list[int] | None:  # fmt: skip
    """Groups to preempt (from ``book``, which it changes) so that ``w`` fits: the newest
    first, only from other namespaces above ``share`` rows and never below it; None when
    that cannot make room."""
    if book.ns_rows[w.namespace] + len(w.rids) > share:
        return None  # its namespace would be above its share: it has no right to preempt
    victims: list[int] = []
    for gid, rows in sorted(book.groups().items(), key=lambda g: -g[1][0].order):
        if book.fits(w, budget):
            break
        ns = rows[0].namespace
        if gid in protected or ns == w.namespace or book.ns_rows[ns] - len(rows) < share:
            continue
        book.remove_group(gid)
        victims.append(gid)
    return victims if book.fits(w, budget) else None


def _slot_victims(book: _Book, w: Waiting, slots: SlotState, share: int,
                  protected: set[int]) -> tuple[str, list[int]] | None:  # fmt: skip
    """An adapter whose running groups to preempt (from ``book``, which it changes) so its
    slot frees for ``w``: one held by namespaces above ``share`` adapters (they keep at least
    ``share``), the one with the fewest rows first; None when there is none."""
    if len(book.adapters_of(w.namespace)) + 1 > share:
        return None
    held: dict[str, set[str]] = defaultdict(set)
    for r in book.rows.values():
        if r.adapter is not None:
            held[r.namespace].add(r.adapter)
    candidates = []
    for adapter in sorted(book.pinned() - set(slots.busy)):
        users = [r for r in book.rows.values() if r.adapter == adapter]
        namespaces = {r.namespace for r in users}
        if w.namespace in namespaces or any(r.gid in protected for r in users):
            continue
        if all(len(held[ns]) - 1 >= share for ns in namespaces):
            candidates.append((len(users), -max(r.order for r in users), adapter, users))
    if not candidates:
        return None
    _, _, adapter, users = min(candidates, key=lambda c: c[:3])
    gids = sorted({r.gid for r in users})
    for gid in gids:
        book.remove_group(gid)
    return adapter, gids


def schedule(state: EngineState, budget: Budget) -> Plan:
    """The plan for the next step (see the module docstring for the policy)."""
    plan = Plan()
    book = _Book(state.running)
    slots = state.slots
    resident = set(slots.resident) if slots else set()
    busy = set(slots.busy) if slots else set()
    free_slots = 0
    if slots is not None:
        free_slots = slots.free if slots.free is not None else slots.n - len(resident | busy)
    admitted: set[int] = set()  # gids admitted this step (never preempted in the same step)
    active = {w.namespace for w in state.waiting} | {r.namespace for r in state.running}
    share_rows = max(1, budget.max_rows // max(1, len(active)))
    share_slots = max(1, slots.n // max(1, len(active))) if slots else 0

    queues: dict[str, list[Waiting]] = defaultdict(list)
    for w in sorted(state.waiting, key=lambda w: w.order):
        queues[w.namespace].append(w)
    while True:
        heads = [q[0] for q in queues.values() if q]
        if not heads:
            break
        w = min(heads, key=lambda w: (book.ns_rows[w.namespace], w.order))
        ns, n = w.namespace, len(w.rids)
        if (budget.rows_per_namespace is not None
                and book.ns_rows[ns] + n > budget.rows_per_namespace) or (
                budget.kv_per_namespace is not None
                and book.ns_kv[ns] + n * w.need > budget.kv_per_namespace):  # fmt: skip
            queues[ns].clear()  # at its cap: the namespace waits for itself
            continue
        mine = book.adapters_of(ns)
        if (w.adapter is not None and slots is not None
                and budget.slots_per_namespace is not None and w.adapter not in mine
                and len(mine) >= budget.slots_per_namespace):  # fmt: skip
            queues[ns].pop(0)  # at its slot cap; its requests on adapters it holds may go
            continue
        trial = book.copy()
        victims: list[int] = []
        evict: str | None = None
        load = w.adapter is not None and slots is not None and w.adapter not in resident
        if load and free_slots <= 0:
            assert slots is not None
            evictable = sorted(resident - trial.pinned() - busy)
            if evictable:
                evict = evictable[0]
            else:
                found = _slot_victims(trial, w, slots, share_slots, admitted)
                if found is None:
                    queues[ns].pop(0)  # waits for a slot; requests behind it may go
                    if w.waited_s > budget.slot_wait_s:
                        plan.fail.append((w.gid, "no free adapter slot", "busy"))
                    continue
                evict, victims = found
        if not trial.fits(w, budget):
            more = _row_victims(trial, w, share_rows, budget, admitted)
            if more is None:
                break  # no overtaking: it goes first when there is room
            victims += more
        book = trial
        plan.preempt += victims
        queues[ns].pop(0)
        if load:
            if evict is None:
                free_slots -= 1
            else:
                resident.discard(evict)
            resident.add(w.adapter)  # type: ignore[arg-type]
        reuse = min(w.reusable, max(w.prefill - 1, 0))
        plan.admit.append(Admit(w.gid, reuse))
        admitted.add(w.gid)
        for i, rid in enumerate(w.rids):
            book.add(Running(rid, w.gid, ns, w.adapter, w.need,
                             to_prefill=w.prefill - reuse if i == 0 else 0,
                             order=w.order))  # fmt: skip

    plan.evict_cache_tokens = max(
        0, state.cache_tokens - (budget.kv_tokens - kv_positions(book.needs()))
    )
    plan.decode = [r.rid for r in state.running if r.decoding and r.rid in book.rows]
    plan.prefill = choose_prefill(
        [r for r in book.rows.values() if r.to_prefill > 0], budget.prefill_chunk
    )
    return plan


def choose_prefill(rows: Sequence[Running], chunk: int) -> list[tuple[int, int]]:
    """Prefill chunks for this step: at most ``chunk`` tokens in all and rows × the widest
    chunk at most ``2 × chunk`` (rows are padded to it), oldest first, interleaved across
    namespaces (each namespace's k-th row before any namespace's (k+1)-th)."""
    rank: Counter[str] = Counter()
    keyed = []
    for r in sorted(rows, key=lambda r: (r.order, r.rid)):
        keyed.append((rank[r.namespace], r.order, r.rid, r))
        rank[r.namespace] += 1
    out: list[tuple[int, int]] = []
    left, width = chunk, 0
    for *_, r in sorted(keyed, key=lambda k: k[:3]):
        if left <= 0:
            break
        n = min(r.to_prefill, left)
        if out and (len(out) + 1) * max(width, n) > 2 * chunk:
            break
        out.append((r.rid, n))
        left -= n
        width = max(width, n)
    return out


def namespace_rows(rows: Iterable[Running]) -> Mapping[str, int]:
    """Rows per namespace (for stats)."""
    return dict(Counter(r.namespace for r in rows))
