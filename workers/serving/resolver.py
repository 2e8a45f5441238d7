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
    """A TTL cache in front of ``resolve(ref) -> AdapterVersion``."""

    def __init__(self, resolve: Callable[[str], AdapterVersion], *, ttl_s: float = 2.0) -> None:
        self._resolve = resolve
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, AdapterVersion]] = {}
        self._lock = threading.Lock()

    def __call__(self, ref: str) -> AdapterVersion:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(ref)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        version = self._resolve(ref)
        with self._lock:
            self._cache[ref] = (now, version)
        return version

    def cached(self, ref: str) -> AdapterVersion | None:
        """The last resolution of ``ref``, if any (no catalog access)."""
        with self._lock:
            hit = self._cache.get(ref)
        return hit[1] if hit else None
