"""Which adapter lives in which device slot: an LRU with pinning and single-flight loads.

A replica has a fixed number of slots (rank-padded tensors in every ``MultiLoraLinear``).
``acquire(key, load)`` returns the slot holding ``key``, loading it on a miss into a free slot
or the least-recently-used unpinned one. A slot is pinned while a row uses it, so an
adapter is never evicted under a running forward pass. Concurrent misses for one key share a
single load; loads of different keys run in parallel (the lock is not held while loading).
A key evicted while pinned (its version unloaded or deleted under running requests) leaves
its slot to the rows that hold it, and the slot is free again when the last of them releases
it — never lost.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


class NoFreeSlot(RuntimeError):
    """Every slot is pinned by an in-flight batch."""


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_errors: int = 0
    coalesced: int = 0  # callers that found the load they needed in flight and waited for it
    evicted: list[str] = field(default_factory=list)


class AdapterSlots:
    """Maps adapter keys to ``n`` slot indices (0 … n-1)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n: at least one slot")
        self.n = n
        self._lock = threading.Lock()
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._pins: dict[int, int] = {}
        self._loading: dict[str, threading.Event] = {}
        self._errors: dict[str, BaseException] = {}
        self._free = list(range(n - 1, -1, -1))
        self._orphans: set[int] = set()  # evicted while pinned: free at the last release
        self.stats = SlotStats()

    def _victim(self) -> int:
        if self._free:
            return self._free.pop()
        for key, slot in self._slot_of.items():  # least recently used first
            if not self._pins.get(slot):
                del self._slot_of[key]
                self.stats.evictions += 1
                self.stats.evicted.append(key)
                return slot
        raise NoFreeSlot(f"all {self.n} adapter slots are in use by running batches")

    def acquire(self, key: str, load: Callable[[int], None]) -> int:
        """The slot holding ``key``, pinned; ``load(slot)`` fills a slot on a miss.

        Call ``release(slot)`` when the batch that uses it is done.

        Raises:
            NoFreeSlot: every slot is pinned. Whatever ``load`` raised, for every waiter.
        """
        while True:
            with self._lock:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._slot_of.move_to_end(key)
                    self._pins[slot] = self._pins.get(slot, 0) + 1
                    self.stats.hits += 1
                    return slot
                waiting = self._loading.get(key)
                if waiting is None:  # this caller loads; later callers wait on the event
                    self.stats.misses += 1
                    slot = self._victim()
                    self._pins[slot] = self._pins.get(slot, 0) + 1  # pinned while loading
                    event = threading.Event()
                    self._loading[key] = event
                    break
                self.stats.coalesced += 1
            waiting.wait()
            with self._lock:
                error = self._errors.get(key)
            if error is not None:
                raise error
        try:
            load(slot)
        except BaseException as exc:
            with self._lock:
                self._pins[slot] -= 1
                self._free.append(slot)
                self._errors[key] = exc
                self.stats.load_errors += 1
                del self._loading[key]
            event.set()
            raise
        with self._lock:
            self._slot_of[key] = slot
            self._errors.pop(key, None)
            self.stats.loads += 1
            del self._loading[key]
        event.set()
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot acquired for a row."""
        with self._lock:
            self._pins[slot] -= 1
            if self._pins[slot] <= 0 and slot in self._orphans:
                self._orphans.discard(slot)
                self._free.append(slot)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def loading(self) -> set[str]:
        """Keys whose load is in flight (they occupy a slot already)."""
        with self._lock:
            return set(self._loading)

    def free(self) -> int:
        """Slots holding nothing (an orphan counts once its last row released it)."""
        with self._lock:
            return len(self._free)

    def evict(self, key: str) -> int | None:
        """Drop ``key`` (deleted, unloaded, or its bytes turned out corrupt); its slot is free
        now if unpinned, else when the last row holding it releases it."""
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                if self._pins.get(slot):
                    self._orphans.add(slot)
                else:
                    self._free.append(slot)
            return slot
