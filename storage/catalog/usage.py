"""Usage metering in the catalog: per-minute buckets of served requests and tokens.

A serving replica counts in memory and adds its counts here in one transaction every few
seconds (``workers.serving.metering``): the catalog sees one write per replica per flush, not
one per request. Buckets are keyed by (minute, namespace, model); ``model`` is an exact
adapter version (``ns/name:3``) or the base's name, ``namespace`` the adapter's (for the bare
base: the caller's, ``""`` for the admin token). Adding is an upsert that sums, so replicas
that flush the same minute, or one that retries a flush, never overwrite each other's counts.

Also here: the snapshots serving replicas write of themselves (tiers, load latencies), which
is how the API and console see serving without a network path to the replicas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from storage.catalog.db import Catalog
from storage.catalog.domain import AdapterVersion
from storage.catalog.models import (
    AdapterRepoRow,
    AdapterVersionRow,
    NamespaceRow,
    ServingReplicaRow,
    UsageBucketRow,
    utcnow,
)
from storage.catalog.repository import READY, _version


@dataclass(frozen=True)
class UsageCount:
    """Counts of one (minute, namespace, model) bucket."""

    minute: datetime
    namespace: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def minute_of(ts: datetime) -> datetime:
    """The bucket a timestamp falls in (its minute, UTC-aware as stored)."""
    return ts.replace(second=0, microsecond=0)


def _insert(db: Catalog) -> Any:
    return pg_insert if db.engine.dialect.name == "postgresql" else sqlite_insert


def add_usage(db: Catalog, counts: Iterable[UsageCount]) -> int:
    """Add counts to their buckets (creating them) in one transaction; returns buckets touched."""
    rows = sorted((c for c in counts if c.requests or c.prompt_tokens or c.completion_tokens),
                  key=lambda c: (c.minute, c.namespace, c.model))  # fmt: skip
    if not rows:
        return 0
    insert = _insert(db)
    with db.session() as s:
        for c in rows:  # in key order: concurrent flushers lock buckets in one order
            stmt = insert(UsageBucketRow).values(
                minute=c.minute, namespace=c.namespace, model=c.model, requests=c.requests,
                prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            )  # fmt: skip
            t = UsageBucketRow.__table__.c
            s.execute(stmt.on_conflict_do_update(
                index_elements=["minute", "namespace", "model"],
                set_={"requests": t.requests + stmt.excluded.requests,
                      "prompt_tokens": t.prompt_tokens + stmt.excluded.prompt_tokens,
                      "completion_tokens": t.completion_tokens + stmt.excluded.completion_tokens},
            ))  # fmt: skip
    return len(rows)


def _model_filter(adapter: str | None) -> Any:
    """``ns/name`` matches every version of it; ``ns/name:3`` that version; a base its name."""
    if adapter is None:
        return None
    col = UsageBucketRow.model
    if "/" in adapter and ":" not in adapter:
        return col.like(f"{adapter}:%")
    return col == adapter


def query_usage(
    db: Catalog,
    *,
    namespace: str | None = None,
    adapter: str | None = None,
    since: datetime | None = None,
    group: Literal["model", "minute"] = "model",
) -> list[UsageCount]:
    """Summed usage: one row per (namespace, model) with ``group="model"`` (``minute`` is the
    first minute seen), or one row per bucket with ``group="minute"`` (oldest first)."""
    b = UsageBucketRow
    where = []
    if namespace is not None:
        where.append(b.namespace == namespace)
    if (cond := _model_filter(adapter)) is not None:
        where.append(cond)
    if since is not None:
        where.append(b.minute >= minute_of(since))
    with db.session() as s:
        if group == "minute":
            rows = s.execute(select(b.minute, b.namespace, b.model, b.requests, b.prompt_tokens,
                                    b.completion_tokens).where(*where)
                             .order_by(b.minute, b.namespace, b.model))  # fmt: skip
        else:
            rows = s.execute(
                select(func.min(b.minute), b.namespace, b.model, func.sum(b.requests),
                       func.sum(b.prompt_tokens), func.sum(b.completion_tokens))
                .where(*where).group_by(b.namespace, b.model)
                .order_by(func.sum(b.requests).desc(), b.model)
            )  # fmt: skip
        return [
            UsageCount(_aware(m), ns, model, int(r), int(p), int(c))
            for m, ns, model, r, p, c in rows
        ]


def idle_versions(
    db: Catalog, *, days: float, namespace: str | None = None, now: datetime | None = None
) -> list[tuple[AdapterVersion, datetime | None]]:
    """Ready versions with no served request for ``days`` (nor created within them), with the
    minute they were last used (None: never), least recently used first."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    with db.session() as s:
        newest = func.max(UsageBucketRow.minute)
        rows = s.execute(select(UsageBucketRow.model, newest).group_by(UsageBucketRow.model))
        last_used = {model: minute for model, minute in rows}
        q = (select(AdapterVersionRow)
             .join(AdapterRepoRow, AdapterRepoRow.id == AdapterVersionRow.repo_id)
             .join(NamespaceRow, NamespaceRow.id == AdapterRepoRow.namespace_id)
             .where(AdapterVersionRow.state == READY))  # fmt: skip
        if namespace is not None:
            q = q.where(NamespaceRow.name == namespace)
        found = []
        for row in s.scalars(q).unique():
            v = _version(s, row)
            used = last_used.get(v.ref)
            used = _aware(used) if used is not None else None
            latest = max(_aware(d) for d in (used, v.created_at) if d is not None)
            if latest < _aware(cutoff):
                found.append((v, used))
        found.sort(key=lambda vu: _aware(vu[1] or vu[0].created_at or cutoff))
        return found


def _aware(d: datetime) -> datetime:
    """SQLite hands back naive datetimes for UTC columns: compare them as UTC."""
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


# -- serving replicas ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaSnapshot:
    """What a serving replica last said about itself."""

    replica_id: str
    base: str
    node: str | None
    stats: dict[str, Any]
    updated_at: datetime


def record_replica(
    db: Catalog, *, replica_id: str, base: str, node: str | None, stats: dict[str, Any]
) -> None:
    """Write (or replace) a replica's snapshot."""
    insert = _insert(db)
    now = utcnow()
    stmt = insert(ServingReplicaRow).values(replica_id=replica_id, base=base, node=node,
                                            stats=stats, updated_at=now)  # fmt: skip
    with db.session() as s:
        s.execute(stmt.on_conflict_do_update(
            index_elements=["replica_id"],
            set_={"base": base, "node": node, "stats": stats, "updated_at": now}))  # fmt: skip


def live_replicas(db: Catalog, *, max_age_s: float = 60.0) -> list[ReplicaSnapshot]:
    """Replicas that wrote a snapshot within ``max_age_s`` (older ones are gone or stuck)."""
    since = utcnow() - timedelta(seconds=max_age_s)
    with db.session() as s:
        rows = s.scalars(select(ServingReplicaRow).where(ServingReplicaRow.updated_at >= since)
                         .order_by(ServingReplicaRow.replica_id))  # fmt: skip
        return [ReplicaSnapshot(r.replica_id, r.base, r.node, dict(r.stats), _aware(r.updated_at))
                for r in rows]  # fmt: skip


def forget_replica(db: Catalog, *, replica_id: str) -> None:
    """A replica that shuts down cleanly removes its snapshot."""
    with db.session() as s:
        s.execute(delete(ServingReplicaRow).where(ServingReplicaRow.replica_id == replica_id))
