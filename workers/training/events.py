"""Job events from rank 0 to the catalog, in order, through catalog outages.

Training must not stop because the catalog restarts: an event that cannot be written stays
queued (in order) and is written by a later ``emit`` once the catalog answers again; attempts
while it is down are spaced by a growing backoff so a step never waits on a dead connection
for long. ``close`` writes whatever is left, retrying until its deadline.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from storage.errors import CatalogUnavailable
from storage.retry import backoff_delays, with_retries

log = logging.getLogger(__name__)

Write = Callable[[str, dict[str, Any]], None]


class EventSink:
    """Queues events and writes them in order with ``write(kind, data)``."""

    def __init__(
        self,
        write: Write,
        *,
        max_pending: int = 100_000,
        close_deadline_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.write, self.max_pending = write, max_pending
        self.close_deadline_s = close_deadline_s
        self.clock, self.sleep = clock, sleep
        self.pending: deque[tuple[str, dict[str, Any]]] = deque()
        self.failures = 0  # consecutive failed attempts
        self.retry_at = 0.0
        self.delays = backoff_delays(first_s=0.5, cap_s=10.0)
        self.dropped = 0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.emit(kind, data)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Queue an event and write what the catalog will take now (never raises for an
        outage)."""
        if len(self.pending) >= self.max_pending:  # a very long outage: keep the newest
            self.pending.popleft()
            self.dropped += 1
        self.pending.append((kind, data))
        if self.clock() >= self.retry_at:
            self._drain()

    def _drain(self) -> None:
        while self.pending:
            kind, data = self.pending[0]
            try:
                self.write(kind, data)
            except CatalogUnavailable as exc:
                if self.failures == 0:
                    log.warning("catalog unavailable (%s): queueing job events", exc)
                self.retry_at = self.clock() + self.delays(self.failures)
                self.failures += 1
                return
            self.pending.popleft()
            if self.failures:
                log.warning("catalog back after %d failed attempts", self.failures)
            self.failures = 0

    def close(self) -> None:
        """Write every queued event, retrying through an outage until the deadline.

        Raises:
            CatalogUnavailable: the catalog stayed down past the deadline.
        """

        def drain_all() -> None:
            self._drain()
            if self.pending:
                raise CatalogUnavailable(f"{len(self.pending)} job events not yet written")

        if self.pending:
            with_retries(
                drain_all,
                retry_on=(CatalogUnavailable,),
                deadline_s=self.close_deadline_s,
                what="writing queued job events",
                clock=self.clock,
                sleep=self.sleep,
            )
        if self.dropped:
            log.warning("%d job events were dropped during a long catalog outage", self.dropped)
