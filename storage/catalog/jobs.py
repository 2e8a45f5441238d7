"""Job rows and job events: creation with idempotency keys, compare-and-set state changes.

The state machine itself belongs to the orchestrator (``orchestrator.lifecycle``); this module
only guarantees that a change happens atomically from an allowed state, so two actors racing
to move one job can never both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, tuple_, update

from storage.catalog.db import Catalog
from storage.catalog.models import JobEventRow, JobRow, NamespaceRow, utcnow
from storage.catalog.repository import _namespace_row
from storage.errors import NotFound, StorageError
from storage.names import validate_name


class JobNotFound(NotFound):
    """No such job (or not in the caller's namespace)."""


class IdempotencyConflict(StorageError):
    """The idempotency key was used before with a different spec."""


class JobStateConflict(StorageError):
    """The job was not in an expected state when a change was attempted."""

    def __init__(self, job_id: str, current: str, wanted_from: Iterable[str], target: str):
        super().__init__(
            f"job {job_id} is {current}; cannot move to {target} "
            f"(only from {', '.join(sorted(wanted_from))})"
        )
        self.current = current


@dataclass(frozen=True)
class Job:
    id: str
    namespace: str
    name: str
    spec: dict[str, Any]
    state: str
    priority: int
    attempts: int
    max_failures: int
    idempotency_key: str | None
    error: str | None
    status_reason: str | None
    checkpoint_uri: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    pack_id: str | None = None  # the pack it trains in now (None: alone)


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    ts: datetime
    kind: str
    data: dict[str, Any]


def _job(row: JobRow, namespace: str) -> Job:
    return Job(
        id=row.id, namespace=namespace, name=row.name, spec=dict(row.spec), state=row.state,
        priority=row.priority, attempts=row.attempts, max_failures=row.max_failures,
        idempotency_key=row.idempotency_key, error=row.error, status_reason=row.status_reason,
        checkpoint_uri=row.checkpoint_uri, created_at=row.created_at, started_at=row.started_at,
        finished_at=row.finished_at, pack_id=row.pack_id,
    )  # fmt: skip


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def create_job(
    db: Catalog,
    *,
    namespace: str,
    name: str,
    spec: dict[str, Any],
    priority: int = 0,
    max_failures: int = 0,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Create a queued job, or return the one an idempotency key already made.

    Returns:
        (job, created): ``created`` is False when the key matched an existing job.

    Raises:
        IdempotencyConflict: the key exists with a different spec.
    """
    validate_name(namespace, kind="namespace")
    validate_name(name, kind="job name")
    with db.session() as s:
        ns = _namespace_row(s, namespace, create=True)
        if idempotency_key is not None:
            existing = s.scalar(
                select(JobRow).where(
                    JobRow.namespace_id == ns.id, JobRow.idempotency_key == idempotency_key
                )
            )
            if existing is not None:
                return _check_same(existing, spec, namespace), False
        row = JobRow(
            id=new_job_id(), namespace_id=ns.id, name=name, spec=spec, state="queued",
            priority=priority, attempts=0, max_failures=max_failures,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
                s.add(JobEventRow(job_id=row.id, kind="state", data={"state": "queued"}))
                s.flush()
        except sa_exc.IntegrityError:
            # Another submission with the same key won the race: return its job.
            s.expire_all()
            winner = s.scalar(
                select(JobRow).where(
                    JobRow.namespace_id == ns.id, JobRow.idempotency_key == idempotency_key
                )
            )
            if winner is None:
                raise
            return _check_same(winner, spec, namespace), False
        return _job(row, namespace), True


def _check_same(row: JobRow, spec: dict[str, Any], namespace: str) -> Job:
    if row.spec != spec:
        raise IdempotencyConflict(
            f"idempotency key {row.idempotency_key!r} was used for job {row.id} with a "
            "different spec"
        )
    return _job(row, namespace)


def get_job(db: Catalog, *, job_id: str, namespace: str | None = None) -> Job:
    """A job by id; with ``namespace``, a job of another namespace is ``JobNotFound`` too."""
    with db.session() as s:
        row = s.get(JobRow, job_id)
        ns = s.get(NamespaceRow, row.namespace_id) if row is not None else None
        if row is None or ns is None or (namespace is not None and ns.name != namespace):
            raise JobNotFound(f"job {job_id} not found")
        return _job(row, ns.name)


def list_jobs(
    db: Catalog, *, namespace: str | None = None, states: Iterable[str] | None = None
) -> list[Job]:
    """Jobs, newest first, optionally filtered by namespace and states."""
    with db.session() as s:
        q = _jobs_query(namespace, states).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        return [_job(row, ns) for row, ns in s.execute(q).all()]


def _jobs_query(namespace: str | None, states: Iterable[str] | None) -> Any:
    """Jobs with their namespace's name, filtered (the one query both listings share)."""
    q = select(JobRow, NamespaceRow.name).join(NamespaceRow, NamespaceRow.id == JobRow.namespace_id)
    if namespace is not None:
        # by id, looked up first: the planner then walks ix_jobs_namespace_created instead of
        # the global index filtered through the join (rows of every other namespace read)
        ns_id = select(NamespaceRow.id).where(NamespaceRow.name == namespace).scalar_subquery()
        q = q.where(JobRow.namespace_id == ns_id)
    if states is not None:
        q = q.where(JobRow.state.in_(list(states)))
    return q


def page_jobs(
    db: Catalog,
    *,
    namespace: str | None = None,
    states: Iterable[str] | None = None,
    limit: int = 20,
    after: str | None = None,
) -> tuple[list[Job], bool]:
    """One page of jobs, newest first: the ``limit`` jobs after job ``after`` (a keyset
    cursor, so a page costs the same however many jobs exist), and whether more follow.

    Raises:
        JobNotFound: ``after`` is not a job (of ``namespace``, when given).
    """
    with db.session() as s:
        q = _jobs_query(namespace, states)
        if after is not None:
            cursor = s.get(JobRow, after)
            if cursor is None or (
                namespace is not None and cursor.namespace_id != _ns_id(s, namespace)
            ):
                raise JobNotFound(f"job {after} not found")
            # a row-value comparison, so the index range starts at the cursor (an OR of the
            # two keys makes PostgreSQL scan from the top of the range and filter)
            q = q.where(tuple_(JobRow.created_at, JobRow.id) < tuple_(cursor.created_at, cursor.id))
        # both keys descending: one backward scan of (namespace_id,) created_at, id serves it
        q = q.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        rows = s.execute(q).all()
        return [_job(row, ns) for row, ns in rows[:limit]], len(rows) > limit


def iter_jobs(
    db: Catalog,
    *,
    namespace: str | None = None,
    states: Iterable[str] | None = None,
    page: int = 100,
) -> Iterator[Job]:
    """Every matching job, newest first, read a page at a time (memory stays flat)."""
    states = list(states) if states is not None else None
    after = None
    while True:
        batch, more = page_jobs(db, namespace=namespace, states=states, limit=page, after=after)
        yield from batch
        if not more:
            return
        after = batch[-1].id


def _ns_id(s: Any, namespace: str) -> int | None:
    return s.scalar(select(NamespaceRow.id).where(NamespaceRow.name == namespace))


def transition_job(
    db: Catalog,
    *,
    job_id: str,
    allowed_from: Iterable[str],
    to: str,
    error: str | None = None,
    status_reason: str | None = None,
    count_attempt: bool = False,
) -> Job:
    """Move a job to ``to`` if (and only if) it is in one of ``allowed_from``; log an event.

    Raises:
        JobNotFound, JobStateConflict.
    """
    with db.session() as s:
        return transition_in(s, job_id=job_id, allowed_from=allowed_from, to=to, error=error,
                             status_reason=status_reason, count_attempt=count_attempt)  # fmt: skip


def transition_in(
    s: Any,
    *,
    job_id: str,
    allowed_from: Iterable[str],
    to: str,
    error: str | None = None,
    status_reason: str | None = None,
    count_attempt: bool = False,
    extra: dict[str, Any] | None = None,
) -> Job:
    """``transition_job`` inside an open session ``s`` (so a caller can move several jobs,
    or a job and its pack, in one transaction); ``extra`` sets more columns with it."""
    allowed = list(allowed_from)
    now = utcnow()
    values: dict[str, Any] = {"state": to, "status_reason": status_reason, "updated_at": now}
    values.update(extra or {})
    if error is not None:
        values["error"] = error
    if to == "running":
        values["started_at"] = now
    if to in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = now
    if count_attempt:
        values["attempts"] = JobRow.attempts + 1
    changed = s.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(allowed)).values(**values)
    ).rowcount
    row = s.get(JobRow, job_id)
    if row is None:
        raise JobNotFound(f"job {job_id} not found")
    if not changed:
        raise JobStateConflict(job_id, row.state, allowed, to)
    data: dict[str, Any] = {"state": to}
    if error:
        data["error"] = error
    s.add(JobEventRow(job_id=job_id, kind="state", data=data))
    s.flush()
    s.refresh(row)
    ns = s.get(NamespaceRow, row.namespace_id)
    assert ns is not None
    return _job(row, ns.name)


def update_job(
    db: Catalog,
    *,
    job_id: str,
    status_reason: str | None = None,
    checkpoint_uri: str | None = None,
) -> None:
    """Set informational fields (why it waits, where its last checkpoint is)."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if status_reason is not None:
        values["status_reason"] = status_reason
    if checkpoint_uri is not None:
        values["checkpoint_uri"] = checkpoint_uri
    with db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def add_event(db: Catalog, *, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """Append a timestamped event (a metrics report, a log line, a checkpoint)."""
    with db.session() as s:
        s.add(JobEventRow(job_id=job_id, kind=kind, data=data))


def add_events(db: Catalog, events: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
    """Append several events, ``(job_id, kind, data)``, in one transaction (a writer that
    reports many steps a second flushes them together)."""
    with db.session() as s:
        for job_id, kind, data in events:
            s.add(JobEventRow(job_id=job_id, kind=kind, data=data))


def list_events(
    db: Catalog,
    *,
    job_id: str,
    after_id: int = 0,
    limit: int = 1000,
    kinds: Iterable[str] | None = None,
) -> list[JobEvent]:
    """Up to ``limit`` events of a job in order, after ``after_id`` (a page: polling, streams
    and API pages continue from the last id); only those of ``kinds`` when given."""
    with db.session() as s:
        q = select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
        if kinds is not None:
            q = q.where(JobEventRow.kind.in_(list(kinds)))
        rows = s.scalars(q.order_by(JobEventRow.id).limit(limit))
        return [JobEvent(r.id, r.job_id, r.ts, r.kind, dict(r.data)) for r in rows]


def latest_events(db: Catalog, *, job_ids: Iterable[str], kind: str) -> dict[str, JobEvent]:
    """Each job's newest event of ``kind`` (two indexed queries for a whole page of jobs)."""
    ids = list(job_ids)
    if not ids:
        return {}
    with db.session() as s:
        newest = (select(func.max(JobEventRow.id))
                  .where(JobEventRow.job_id.in_(ids), JobEventRow.kind == kind)
                  .group_by(JobEventRow.job_id))  # fmt: skip
        rows = s.scalars(select(JobEventRow).where(JobEventRow.id.in_(newest)))
        return {r.job_id: JobEvent(r.id, r.job_id, r.ts, r.kind, dict(r.data)) for r in rows}


def iter_events(
    db: Catalog, *, job_id: str, kinds: Iterable[str] | None = None, page: int = 1000
) -> Iterator[JobEvent]:
    """Every event of a job (of ``kinds`` when given), read a page at a time."""
    last = 0
    while batch := list_events(db, job_id=job_id, after_id=last, limit=page, kinds=kinds):
        yield from batch
        last = batch[-1].id
        if len(batch) < page:
            return
