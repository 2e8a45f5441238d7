"""Counting served requests in memory and writing them to the catalog in batches.

The ingress adds one count per answered request — the same prompt and completion token counts
its ``usage`` field returns — to a ``UsageMeter``; a ``Periodic`` thread drains the meter into
the catalog every few seconds (one transaction for all buckets since the last flush). A flush
the catalog refuses puts its counts back, so an outage delays metering but loses nothing; the
last flush runs when the replica shuts down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from storage.catalog.models import utcnow
from storage.catalog.usage import UsageCount, minute_of

log = logging.getLogger(__name__)
Key = tuple[datetime, str, str]  # (minute, namespace, model)


class UsageMeter:
    """Thread-safe per-minute counters of requests and tokens, drained by a flusher."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[Key, list[int]] = {}

    def add(
        self, *, namespace: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Count one answered request in the current minute's bucket."""
        key = (minute_of(self._clock()), namespace, model)
        with self._lock:
            c = self._counts.setdefault(key, [0, 0, 0])
            c[0] += 1
            c[1] += prompt_tokens
            c[2] += completion_tokens

    def drain(self) -> list[UsageCount]:
        """Take every count so far (the meter starts empty again)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return [UsageCount(m, ns, model, *c) for (m, ns, model), c in counts.items()]

    def restore(self, counts: list[UsageCount]) -> None:
        """Put back counts a failed flush took (added to whatever came meanwhile)."""
        with self._lock:
            for u in counts:
                c = self._counts.setdefault((u.minute, u.namespace, u.model), [0, 0, 0])
                c[0] += u.requests
                c[1] += u.prompt_tokens
                c[2] += u.completion_tokens

    def pending(self) -> int:
        """Requests counted and not yet flushed."""
        with self._lock:
            return sum(c[0] for c in self._counts.values())

    def flush(self, write: Callable[[list[UsageCount]], object]) -> int:
        """Write the drained counts with ``write``; on failure restore them and re-raise.

        Returns the requests written.
        """
        counts = self.drain()
        if not counts:
            return 0
        try:
            write(counts)
        except BaseException:
            self.restore(counts)
            raise
        return sum(c.requests for c in counts)


class Periodic:
    """Calls ``task`` every ``interval_s`` in a daemon thread, and once more at ``stop``.

    A failing call is logged and retried at the next tick: metering and replica snapshots
    must never take a serving replica down.
    """

    def __init__(self, task: Callable[[], object], interval_s: float, name: str) -> None:
        self.task, self.interval_s = task, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failures = 0

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _tick(self) -> None:
        try:
            self.task()
        except Exception as exc:  # the catalog is down: the next tick tries again
            self.failures += 1
            log.warning("%s failed (%s); retrying in %.0f s", self._thread.name, exc,
                        self.interval_s)  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def stop(self, timeout_s: float = 10.0, *, final: bool = True) -> None:
        """Stop the thread and, with ``final``, run ``task`` a last time (a final flush)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if final:
            self._tick()
