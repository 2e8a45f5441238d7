"""Packs: jobs on one base that train together in one worker group.

A pack is ``open`` while it takes joiners and ``closed`` once its runner stops taking them.
Joining locks the pack's row and checks it is open and has a free slot in the same
transaction that moves the job to ``starting``; closing takes the same lock. So a job joins
only a pack whose runner will still see it: the runner closes first, then reads its members
one last time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from storage.catalog.db import Catalog
from storage.catalog.jobs import Job, JobStateConflict, _job, transition_in
from storage.catalog.models import JobRow, NamespaceRow, PackRow, utcnow
from storage.errors import NotFound, StorageError

# the states of a job that holds a slot in its pack (the orchestrator's active states)
IN_PACK = ("starting", "running", "retrying")


class PackNotFound(NotFound):
    """No such pack."""


class PackUnavailable(StorageError):
    """The pack is closed or full: the job stays queued (the next tick places it again)."""


@dataclass(frozen=True)
class Pack:
    """A pack and the jobs that train in it now (starting or running)."""

    id: str
    pack_key: str
    state: str
    max_slots: int
    created_at: datetime
    closed_at: datetime | None
    jobs: tuple[str, ...]

    @property
    def free_slots(self) -> int:
        return max(0, self.max_slots - len(self.jobs)) if self.state == "open" else 0


def new_pack_id() -> str:
    return f"pack-{uuid.uuid4().hex[:24]}"


def _members(s: object, pack_ids: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {p: [] for p in pack_ids}
    if not pack_ids:
        return out
    rows = s.execute(  # type: ignore[attr-defined]
        select(JobRow.pack_id, JobRow.id)
        .where(JobRow.pack_id.in_(list(pack_ids)), JobRow.state.in_(IN_PACK))
        .order_by(JobRow.created_at, JobRow.id)
    )
    for pack_id, job_id in rows:
        out[pack_id].append(job_id)
    return out


def _pack(row: PackRow, members: list[str]) -> Pack:
    return Pack(row.id, row.pack_key, row.state, row.max_slots, row.created_at, row.closed_at,
                tuple(members))  # fmt: skip


def start_pack(
    db: Catalog, *, pack_key: str, max_slots: int, job_ids: Sequence[str]
) -> tuple[Pack, list[str]]:
    """Create an open pack and move its first jobs ``queued → starting`` into it, atomically.

    A job no longer queued (cancelled since the decision) is left out.

    Returns:
        (the pack, the ids of the jobs that entered it).
    """
    pack_id = new_pack_id()
    entered = []
    with db.session() as s:
        row = PackRow(id=pack_id, pack_key=pack_key, state="open", max_slots=max_slots)
        s.add(row)
        s.flush()
        for job_id in job_ids:
            try:
                with s.begin_nested():
                    transition_in(s, job_id=job_id, allowed_from={"queued"}, to="starting",
                                  count_attempt=True, extra={"pack_id": pack_id})  # fmt: skip
            except JobStateConflict:
                continue
            entered.append(job_id)
        return _pack(row, entered), entered


def join_pack(db: Catalog, *, job_id: str, pack_id: str) -> Job:
    """Move a queued job into a running pack (``queued → starting``) if it is open and has a
    free slot; its runner picks the job up at the next step boundary.

    Raises:
        PackNotFound; PackUnavailable (closed or full); JobStateConflict (no longer queued).
    """
    with db.session() as s:
        row = s.scalar(select(PackRow).where(PackRow.id == pack_id).with_for_update())
        if row is None:
            raise PackNotFound(f"pack {pack_id} not found")
        members = _members(s, [pack_id])[pack_id]
        if row.state != "open" or len(members) >= row.max_slots:
            raise PackUnavailable(
                f"pack {pack_id} is {'full' if row.state == 'open' else 'closed'}"
            )
        return transition_in(s, job_id=job_id, allowed_from={"queued"}, to="starting",
                             count_attempt=True, extra={"pack_id": pack_id})  # fmt: skip


def close_pack(db: Catalog, *, pack_id: str) -> None:
    """Take no more joiners (idempotent). Read the members after this for the final list."""
    with db.session() as s:
        s.execute(
            update(PackRow)
            .where(PackRow.id == pack_id, PackRow.state == "open")
            .values(state="closed", closed_at=utcnow())
        )


def leave_pack(db: Catalog, *, job_id: str) -> None:
    """The job trains alone from now on (resumed after its pack's runner was lost)."""
    with db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(pack_id=None))


def get_pack(db: Catalog, *, pack_id: str) -> Pack:
    """A pack with its current members. Raises: PackNotFound."""
    with db.session() as s:
        row = s.get(PackRow, pack_id)
        if row is None:
            raise PackNotFound(f"pack {pack_id} not found")
        return _pack(row, _members(s, [pack_id])[pack_id])


def pack_jobs(db: Catalog, *, pack_id: str, states: Iterable[str] | None = None) -> list[Job]:
    """The jobs in a pack now (of ``states`` when given), oldest first."""
    with db.session() as s:
        q = (
            select(JobRow, NamespaceRow.name)
            .join(NamespaceRow, NamespaceRow.id == JobRow.namespace_id)
            .where(JobRow.pack_id == pack_id)
        )
        if states is not None:
            q = q.where(JobRow.state.in_(list(states)))
        rows = s.execute(q.order_by(JobRow.created_at, JobRow.id)).all()
        return [_job(row, ns) for row, ns in rows]


def list_packs(db: Catalog, *, states: Iterable[str] | None = None, limit: int = 100) -> list[Pack]:
    """Packs, newest first (``open`` ones: those that can take joiners), with their members."""
    with db.session() as s:
        q = select(PackRow)
        if states is not None:
            q = q.where(PackRow.state.in_(list(states)))
        rows = list(
            s.scalars(q.order_by(PackRow.created_at.desc(), PackRow.id.desc()).limit(limit))
        )
        members = _members(s, [r.id for r in rows])
        return [_pack(r, members[r.id]) for r in rows]
