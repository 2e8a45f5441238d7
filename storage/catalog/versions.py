"""Adapter versions: created with consecutive numbers, resolved (latest, exact, alias),
listed, deleted; and the leases and references that garbage collection reads.

Version numbers come from an atomic ``UPDATE … SET last_version = last_version + 1 …
RETURNING`` on the adapter's repo row: a row lock on PostgreSQL, the database write lock on
SQLite (``BEGIN IMMEDIATE``), so concurrent publishes of one name get distinct consecutive
versions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage.catalog.bases import _base
from storage.catalog.db import Catalog
from storage.catalog.domain import (
    AdapterVersion,
    FileDigest,
)
from storage.catalog.models import (
    AdapterRepoRow,
    AdapterTagRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    CatalogEventRow,
    NamespaceRow,
    PublishLeaseRow,
)
from storage.catalog.namespaces import _namespace_row
from storage.errors import (
    AdapterNotFound,
    InUse,
)
from storage.names import AdapterRef, validate_name

READY, PENDING, DELETED = "ready", "pending", "deleted"


def _version(session: Session, row: AdapterVersionRow) -> AdapterVersion:
    ns_name = session.get(NamespaceRow, row.repo.namespace_id)
    aliases = session.scalars(select(AliasRow.alias).where(AliasRow.version_id == row.id)).all()
    return AdapterVersion(
        id=row.id,
        namespace=ns_name.name if ns_name else "?",
        name=row.repo.name,
        version=row.version,
        state=row.state,
        base_model=_base(row.base_model),
        object_prefix=row.object_prefix,
        files=tuple(
            FileDigest(name, f["sha256"], int(f["size"])) for name, f in sorted(row.files.items())
        ),
        total_bytes=row.total_bytes,
        r=row.r,
        alpha=row.alpha,
        target_modules=row.target_modules,
        use_rslora=row.use_rslora,
        job_id=row.job_id,
        dataset_sha256=row.dataset_sha256,
        metrics=dict(row.metrics or {}),
        hyperparameters=dict(row.hyperparameters or {}),
        tags=tuple(sorted(t.tag for t in row.tags)),
        created_by=row.created_by,
        created_at=row.created_at,
        aliases=tuple(sorted(aliases)),
        spectrum=row.spectrum,
        method=row.method,
    )


def create_adapter_version(
    db: Catalog,
    *,
    namespace: str,
    name: str,
    base_model_id: int,
    object_prefix: str,
    files: Iterable[FileDigest],
    r: int,
    alpha: float,
    target_modules: list[str] | str,
    use_rslora: bool,
    job_id: str | None = None,
    dataset_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    tags: Iterable[str] = (),
    created_by: str | None = None,
    state: str = READY,
    spectrum: dict[str, Any] | None = None,
    method: str = "lora",
) -> AdapterVersion:
    """Create the next version of ``namespace/name`` in one transaction."""
    validate_name(namespace, kind="namespace")
    validate_name(name, kind="adapter name")
    file_list = list(files)
    with db.session() as s:
        ns = _namespace_row(s, namespace, create=True)
        repo = s.scalar(
            select(AdapterRepoRow).where(
                AdapterRepoRow.namespace_id == ns.id, AdapterRepoRow.name == name
            )
        )
        if repo is None:
            try:
                with s.begin_nested():
                    s.add(AdapterRepoRow(namespace_id=ns.id, name=name, last_version=0))
            except sa_exc.IntegrityError:
                pass  # created concurrently
        version = s.execute(
            update(AdapterRepoRow)
            .where(AdapterRepoRow.namespace_id == ns.id, AdapterRepoRow.name == name)
            .values(last_version=AdapterRepoRow.last_version + 1)
            .returning(AdapterRepoRow.last_version, AdapterRepoRow.id)
        ).one()
        row = AdapterVersionRow(
            repo_id=version.id,
            version=version.last_version,
            base_model_id=base_model_id,
            job_id=job_id,
            dataset_sha256=dataset_sha256,
            r=r,
            alpha=alpha,
            target_modules=target_modules,
            use_rslora=use_rslora,
            object_prefix=object_prefix,
            files={f.name: {"sha256": f.sha256, "size": f.size} for f in file_list},
            total_bytes=sum(f.size for f in file_list),
            metrics=metrics or {},
            hyperparameters=hyperparameters or {},
            spectrum=spectrum,
            method=method,
            created_by=created_by,
            state=state,
            tags=[AdapterTagRow(tag=t) for t in sorted(set(tags))],
        )
        s.add(row)
        s.flush()
        return _version(s, row)


def _repo(s: Session, namespace: str, name: str) -> AdapterRepoRow:
    repo = s.scalar(
        select(AdapterRepoRow)
        .join(NamespaceRow, NamespaceRow.id == AdapterRepoRow.namespace_id)
        .where(NamespaceRow.name == namespace, AdapterRepoRow.name == name)
    )
    if repo is None:
        raise AdapterNotFound(f"adapter {namespace}/{name} does not exist")
    return repo


def _resolve_row(s: Session, ref: AdapterRef) -> AdapterVersionRow:
    repo = _repo(s, ref.namespace, ref.name)
    if ref.alias is not None:
        row = s.scalar(
            select(AdapterVersionRow)
            .join(AliasRow, AliasRow.version_id == AdapterVersionRow.id)
            .where(AliasRow.repo_id == repo.id, AliasRow.alias == ref.alias)
        )
        if row is None:
            raise AdapterNotFound(f"alias {ref} does not exist")
    elif ref.version is not None:
        row = s.scalar(
            select(AdapterVersionRow).where(
                AdapterVersionRow.repo_id == repo.id, AdapterVersionRow.version == ref.version
            )
        )
        if row is None:
            raise AdapterNotFound(f"adapter version {ref} does not exist")
    else:
        row = s.scalar(
            select(AdapterVersionRow)
            .where(AdapterVersionRow.repo_id == repo.id, AdapterVersionRow.state == READY)
            .order_by(AdapterVersionRow.version.desc())
            .limit(1)
        )
        if row is None:
            raise AdapterNotFound(f"adapter {ref} has no ready version")
    if row.state != READY:
        raise AdapterNotFound(f"adapter version {ref.repo}:{row.version} is {row.state}")
    return row


def resolve_adapter(db: Catalog, *, ref: AdapterRef) -> AdapterVersion:
    """The ready version a reference names (latest, exact or by alias).

    Raises:
        AdapterNotFound: no such adapter, version or alias, or the version is not ready.
    """
    with db.session() as s:
        return _version(s, _resolve_row(s, ref))


def ready_versions(db: Catalog, *, refs: Iterable[AdapterRef]) -> set[str]:
    """Which of these exact versions (``ns/name:N``) the catalog holds ready, in one query
    (a serving replica checks its resident versions this way)."""
    wanted = {(r.namespace, r.name, r.version) for r in refs if r.version is not None}
    if not wanted:
        return set()
    with db.session() as s:
        rows = s.execute(
            select(NamespaceRow.name, AdapterRepoRow.name, AdapterVersionRow.version)
            .join(AdapterRepoRow, AdapterRepoRow.namespace_id == NamespaceRow.id)
            .join(AdapterVersionRow, AdapterVersionRow.repo_id == AdapterRepoRow.id)
            .where(AdapterVersionRow.state == READY,
                   AdapterRepoRow.name.in_({name for _, name, _ in wanted}))
        ).all()  # fmt: skip
    return {f"{ns}/{name}:{v}" for ns, name, v in rows if (ns, name, v) in wanted}


def resolve_version_number(db: Catalog, *, ref: AdapterRef) -> int:
    """Only the version number a reference resolves to (one indexed query; serving's hot path)."""
    with db.session() as s:
        return _resolve_row(s, ref).version


def _versions_query(
    namespace: str | None,
    name: str | None,
    base_model: str | None,
    tag: str | None,
    include_deleted: bool,
) -> Any:
    q = (
        select(AdapterVersionRow)
        .join(AdapterRepoRow, AdapterRepoRow.id == AdapterVersionRow.repo_id)
        .join(NamespaceRow, NamespaceRow.id == AdapterRepoRow.namespace_id)
    )
    if namespace is not None:
        q = q.where(NamespaceRow.name == namespace)
    if name is not None:
        q = q.where(AdapterRepoRow.name == name)
    if base_model is not None:
        q = q.join(BaseModelRow, BaseModelRow.id == AdapterVersionRow.base_model_id).where(
            BaseModelRow.name == base_model
        )
    if tag is not None:
        q = q.join(
            AdapterTagRow,
            and_(AdapterTagRow.version_id == AdapterVersionRow.id, AdapterTagRow.tag == tag),
        )
    if not include_deleted:
        q = q.where(AdapterVersionRow.state != DELETED)
    return q


def list_adapter_versions(
    db: Catalog,
    *,
    namespace: str | None = None,
    name: str | None = None,
    base_model: str | None = None,
    tag: str | None = None,
    include_deleted: bool = False,
) -> list[AdapterVersion]:
    """Versions matching every given filter, newest first within each name."""
    with db.session() as s:
        q = _versions_query(namespace, name, base_model, tag, include_deleted)
        q = q.order_by(NamespaceRow.name, AdapterRepoRow.name, AdapterVersionRow.version.desc())
        return [_version(s, r) for r in s.scalars(q).unique()]


def page_adapter_versions(
    db: Catalog,
    *,
    namespace: str | None = None,
    base_model: str | None = None,
    tag: str | None = None,
    limit: int = 20,
    after: AdapterRef | None = None,
) -> tuple[list[AdapterVersion], bool]:
    """One page of versions, newest published first: the ``limit`` versions after the exact
    version ``after`` (a keyset cursor on the primary key), and whether more follow.

    Raises:
        AdapterNotFound: ``after`` is not a version (of ``namespace``, when given).
    """
    with db.session() as s:
        q = _versions_query(namespace, None, base_model, tag, False)
        if after is not None:
            if after.version is None or (namespace is not None and after.namespace != namespace):
                raise AdapterNotFound(f"{after} is not an exact version of this list")
            # any state: a version deleted since the last page still marks the place
            cursor = s.scalar(select(AdapterVersionRow.id).where(
                AdapterVersionRow.repo_id == _repo(s, after.namespace, after.name).id,
                AdapterVersionRow.version == after.version))  # fmt: skip
            if cursor is None:
                raise AdapterNotFound(f"adapter version {after} does not exist")
            q = q.where(AdapterVersionRow.id < cursor)
        rows = list(s.scalars(q.order_by(AdapterVersionRow.id.desc()).limit(limit + 1)).unique())
        return [_version(s, r) for r in rows[:limit]], len(rows) > limit


DELETED_EVENT, DELETED_FORCED = "deleted", "deleted_forced"


def delete_adapter_version(
    db: Catalog, *, ref: AdapterRef, force: bool = False, actor: str | None = None
) -> AdapterVersion:
    """Mark a version deleted (``gc`` removes its bytes); every delete is a catalog event.

    An alias pointing at the version protects it: its gate judged the version in place, and
    deleting it would let any version through a relative rule. ``force`` (the caller checked
    the actor is an admin) deletes it anyway, drops those aliases and records which.

    Raises:
        InUse: aliases point at the version and ``force`` is off (nothing changed).
    """
    with db.session() as s:
        row = _resolve_row(s, ref)
        aliases = list(s.scalars(select(AliasRow).where(AliasRow.version_id == row.id)))
        names = sorted(a.alias for a in aliases)
        label = f"{ref.namespace}/{ref.name}:{row.version}"
        if names and not force:
            raise InUse(
                f"{label} is {', '.join('@' + n for n in names)}: promote another version to "
                f"{'them' if len(names) > 1 else 'it'} first (an admin may delete it with "
                "force; it is recorded)"
            )
        for alias in aliases:
            s.delete(alias)
        row.state = DELETED
        s.add(CatalogEventRow(repo_id=row.repo_id, kind=DELETED_FORCED if names else DELETED,
                              version=row.version, actor=actor,
                              data={"aliases": names}))  # fmt: skip
        s.flush()
        return _version(s, row)


def live_blob_digests(db: Catalog) -> set[str]:
    """SHA-256 of every blob a registered base or an uploaded file still needs."""
    from storage.catalog.models import FileRow

    with db.session() as s:
        live = set(s.scalars(select(FileRow.sha256)))
        for files in s.scalars(select(BaseModelRow.files)):
            live |= {f["sha256"] for f in (files or {}).values()}
        return live


def take_publish_lease(db: Catalog, *, prefix: str) -> None:
    """Record a publish in flight under ``prefix`` (before its first object is uploaded)."""
    with db.session() as s:
        s.add(PublishLeaseRow(prefix=prefix))


def drop_publish_lease(db: Catalog, *, prefix: str) -> None:
    """The publish under ``prefix`` ended (its version row exists, or it failed)."""
    with db.session() as s:
        s.execute(delete(PublishLeaseRow).where(PublishLeaseRow.prefix == prefix))


def leased_prefixes(db: Catalog) -> set[str]:
    """Prefixes of publishes in flight (gc keeps their objects)."""
    with db.session() as s:
        return set(s.scalars(select(PublishLeaseRow.prefix)))


def live_object_prefixes(db: Catalog) -> set[str]:
    """Object prefixes of every version that is not deleted (what ``gc`` must keep)."""
    with db.session() as s:
        rows = s.scalars(
            select(AdapterVersionRow.object_prefix).where(AdapterVersionRow.state != DELETED)
        )
        return set(rows)
