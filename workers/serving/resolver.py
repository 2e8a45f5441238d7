"""Adapter references resolved through the catalog with a short TTL.

Every resolution is trusted for ``ttl_s`` only. ``ns/name`` (latest) and ``ns/name@alias`` may
move, so promoting an alias in the catalog moves traffic within the TTL, with no redeploy.
``ns/name:3`` names one immutable version, but it can be deleted (and its bytes collected): it
too is checked again after the TTL, so a deleted version stops being served within it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from storage.catalog.domain import AdapterVersion


class RefResolver:
    """A TTL cache in front of ``resolve(ref) -> AdapterVersion``; concurrent misses of one
    reference share one catalog query (a burst at expiry asks once, not once per request)."""

    def __init__(self, resolve: Callable[[str], AdapterVersion], *, ttl_s: float = 2.0) -> None:
        self._resolve = resolve
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, AdapterVersion]] = {}
        self._lock = threading.Lock()
        self._flights: dict[str, threading.Lock] = {}

    def fresh(self, ref: str) -> AdapterVersion | None:
        """The cached resolution of ``ref`` if within the TTL (no catalog access)."""
        hit = self._cache.get(ref)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def __call__(self, ref: str) -> AdapterVersion:
        hit = self.fresh(ref)
        if hit is not None:
            return hit
        with self._lock:
            flight = self._flights.setdefault(ref, threading.Lock())
        with flight:
            hit = self.fresh(ref)  # another caller may have resolved it meanwhile
            if hit is not None:
                return hit
            now = time.monotonic()
            version = self._resolve(ref)
            with self._lock:
                self._cache[ref] = (now, version)
            return version

    def cached(self, ref: str) -> AdapterVersion | None:
        """The last resolution of ``ref``, if any (no catalog access)."""
        with self._lock:
            hit = self._cache.get(ref)
        return hit[1] if hit else None
