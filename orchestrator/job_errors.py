"""What a failed job tells its users, and what only its admins see.

A job's ``error`` is read by anyone who may read the job, so it never carries the server's
own details: a fault of the object store or the catalog (their messages name buckets,
endpoints, keys and paths) becomes one generic sentence, and any other message has its URIs,
host:port pairs and absolute paths replaced. The full text goes to the log and to a
``failure_detail`` event, which the API shows to admin tokens only. Pure functions.
"""

from __future__ import annotations

import re

from storage.errors import (
    CatalogUnavailable,
    IntegrityError,
    ObjectNotFound,
    ObjectStoreUnavailable,
)

DETAIL_EVENT = "failure_detail"  # an event only admin tokens see
STORE_FAULTS = (ObjectNotFound, IntegrityError, ObjectStoreUnavailable, CatalogUnavailable)
_STORE_NAMES = {t.__name__ for t in STORE_FAULTS} | {
    "ClientError", "EndpointConnectionError", "NoCredentialsError", "ConnectionClosedError",
    "ReadTimeoutError", "OperationalError",
}  # fmt: skip
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_HOST = re.compile(r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+):\d{2,5}\b")
_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def redact(text: str) -> str:
    """``text`` with URIs, host:port pairs and absolute paths replaced by placeholders."""
    return _PATH.sub("<path>", _HOST.sub("<host>", _URI.sub("<uri>", text)))


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``__cause__``, Ray's ``cause``, Ray Train's worker
    failures), outermost first."""
    out: list[BaseException] = []
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
        for inner in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)
    return out


def public_failure(message: str, exc: BaseException | None = None) -> str:
    """What a failed job's ``error`` says, for ``message`` (the full text: it goes to the log
    and, when it differs, to an admin-only event) raised as ``exc``.

    A fault of the object store or the catalog anywhere in ``exc``'s chain, or named in the
    message (a worker's report arrives as text), becomes one generic sentence, keeping the
    stage it happened in ("publish failed: …"); anything else is its first line, redacted.
    """
    stage, sep, _ = message.partition(": ")
    stage = stage if sep and " " in stage and ":" not in stage else ""
    chain = _causes(exc) if exc is not None else []
    faults = [type(e).__name__ for e in chain
              if isinstance(e, STORE_FAULTS) or type(e).__name__ in _STORE_NAMES]  # fmt: skip
    if not faults:
        faults = [n for n in _STORE_NAMES if n in message]
    if faults:
        public = (f"storage failed ({faults[0]}); an admin sees the detail in the job's "
                  "events")  # fmt: skip
        return f"{stage}: {public}" if stage else public
    first = next((ln.strip() for ln in message.strip().splitlines() if ln.strip()), "failed")
    return redact(first)
