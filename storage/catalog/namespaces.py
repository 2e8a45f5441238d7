"""Namespaces (teams): created on first use, their limits set by an admin."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.catalog.db import Catalog
from storage.catalog.domain import (
    Namespace,
)
from storage.catalog.models import (
    NamespaceRow,
)
from storage.errors import (
    NotFound,
)
from storage.names import validate_name

DEFAULT_MAX_PRIORITY = 0  # every tenant equal until an admin raises a namespace's maximum


def _ns(row: NamespaceRow) -> Namespace:
    max_priority = row.max_priority if row.max_priority is not None else DEFAULT_MAX_PRIORITY
    return Namespace(row.id, row.name, row.max_concurrent_jobs, row.max_gpus, row.max_cpus,
                     max_priority)  # fmt: skip


def _namespace_row(session: Session, name: str, *, create: bool) -> NamespaceRow:
    row = session.scalar(select(NamespaceRow).where(NamespaceRow.name == name))
    if row is not None:
        return row
    if not create:
        raise NotFound(f"namespace {name!r} does not exist")
    validate_name(name, kind="namespace")  # the one gate every new namespace passes
    try:
        with session.begin_nested():
            row = NamespaceRow(name=name)
            session.add(row)
    except sa_exc.IntegrityError:  # created concurrently: use that one
        row = session.scalar(select(NamespaceRow).where(NamespaceRow.name == name))
    assert row is not None
    return row


def ensure_namespace(db: Catalog, *, name: str) -> Namespace:
    """Get or create a namespace."""
    validate_name(name, kind="namespace")
    with db.session() as s:
        return _ns(_namespace_row(s, name, create=True))


def list_namespaces(db: Catalog) -> list[Namespace]:
    """Every namespace with its limits, by name."""
    with db.session() as s:
        return [_ns(r) for r in s.scalars(select(NamespaceRow).order_by(NamespaceRow.name))]


def get_namespace(db: Catalog, *, name: str) -> Namespace:
    """Raises ``NotFound``."""
    with db.session() as s:
        return _ns(_namespace_row(s, name, create=False))


def set_namespace_limits(
    db: Catalog,
    *,
    namespace: str,
    max_concurrent_jobs: int | None = None,
    max_cpus: float | None = None,
    max_gpus: float | None = None,
    max_priority: int | None = None,
) -> Namespace:
    """Set a namespace's quota (None lifts a limit; ``max_priority`` None is the default 0)."""
    validate_name(namespace, kind="namespace")
    with db.session() as s:
        row = _namespace_row(s, namespace, create=True)
        row.max_concurrent_jobs = max_concurrent_jobs
        row.max_cpus = max_cpus
        row.max_gpus = max_gpus
        row.max_priority = max_priority
        s.flush()
        return _ns(row)
