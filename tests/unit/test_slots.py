"""Adapter slots: LRU eviction, pinning, single-flight loads, errors reach every waiter."""

from __future__ import annotations

import threading
import time

import pytest

from workers.serving.slots import AdapterSlots, NoFreeSlot


def test_hits_misses_and_lru_eviction():
    slots = AdapterSlots(2)
    loaded: list[tuple[str, int]] = []

    def loader(key):  # type: ignore[no-untyped-def]
        return lambda slot: loaded.append((key, slot))

    a = slots.acquire("a", loader("a"))
    b = slots.acquire("b", loader("b"))
    assert {a, b} == {0, 1}
    slots.release(a)
    slots.release(b)
    assert slots.acquire("a", loader("a")) == a  # hit, and "a" becomes most recent
    slots.release(a)
    c = slots.acquire("c", loader("c"))  # evicts "b", the least recently used
    assert c == b and slots.stats.evicted == ["b"]
    assert slots.resident() == {"a": a, "c": c}
    assert (slots.stats.hits, slots.stats.misses, slots.stats.loads) == (1, 3, 3)


def test_pinned_slots_are_never_evicted():
    slots = AdapterSlots(1)
    slot = slots.acquire("a", lambda s: None)
    with pytest.raises(NoFreeSlot):
        slots.acquire("b", lambda s: None)
    slots.release(slot)
    assert slots.acquire("b", lambda s: None) == slot


def _until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(1000):
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_misses_share_one_load() -> None:
    slots = AdapterSlots(4)
    gate = threading.Event()
    loads = []

    def slow_load(slot: int) -> None:
        loads.append(slot)
        assert gate.wait(10)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(slots.acquire("x", slow_load)))
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    # the load is held until the nine others are blocked waiting for it
    _until(lambda: slots.stats.coalesced == 9, "nine callers waiting on the one load")
    gate.set()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(set(results)) == 1 and len(results) == 10
    assert (slots.stats.misses, slots.stats.loads) == (1, 1)


def test_a_failed_load_reaches_every_waiter_and_frees_the_slot() -> None:
    slots = AdapterSlots(1)
    gate = threading.Event()
    calls = []

    def broken(slot: int) -> None:
        calls.append(slot)
        assert gate.wait(10)
        raise ValueError("corrupt adapter")

    errors = []

    def worker() -> None:
        try:
            slots.acquire("bad", broken)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    _until(lambda: slots.stats.coalesced == 2, "two callers waiting on the one load")
    gate.set()
    for t in threads:
        t.join()
    assert len(errors) == 3 and len(calls) == 1  # one load failed; all three were told
    assert slots.stats.load_errors == 1
    assert slots.acquire("good", lambda s: None) == 0  # the slot was given back
