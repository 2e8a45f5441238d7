"""Retrying an operation through an outage of the catalog or the object store.

Retries are for infrastructure: only the exception types given (``CatalogUnavailable``,
``ObjectStoreUnavailable``) are retried, with exponential backoff until a deadline; anything
else, and the last failure after the deadline, propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff_delays(
    first_s: float = 0.25, factor: float = 2.0, cap_s: float = 5.0
) -> Callable[[int], float]:
    """The delay before retry ``n`` (0-based): ``first_s·factor^n``, at most ``cap_s``."""
    return lambda n: min(cap_s, first_s * factor**n)


def with_retries(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    deadline_s: float,
    what: str,
    delays: Callable[[int], float] = backoff_delays(),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on ``retry_on`` until ``deadline_s`` from now has passed.

    Raises:
        the last ``retry_on`` error once the deadline has passed; any other error at once.
    """
    end = clock() + deadline_s
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as exc:
            wait = delays(attempt)
            if clock() + wait > end:
                raise
            if attempt == 0:
                log.warning("%s failed (%s); retrying for up to %.0f s", what, exc, deadline_s)
            sleep(wait)
            attempt += 1
