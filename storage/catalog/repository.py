"""Catalog repository: keyword-only functions that take a ``Catalog`` and return domain objects.

Transactions are short and each function is one. Version numbers come from an atomic
``UPDATE … SET last_version = last_version + 1 … RETURNING`` on the adapter's repo row: a row
lock on PostgreSQL, the database write lock on SQLite (``BEGIN IMMEDIATE``), so concurrent
publishes of one name get distinct consecutive versions.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage.catalog.db import Catalog
from storage.catalog.domain import (
    TOKEN_SCOPES,
    AdapterVersion,
    ApiToken,
    BaseModel,
    FileDigest,
    Namespace,
)
from storage.catalog.models import (
    AdapterRepoRow,
    AdapterTagRow,
    AdapterVersionRow,
    AliasRow,
    ApiTokenRow,
    BaseModelRow,
    CatalogEventRow,
    NamespaceRow,
    PublishLeaseRow,
    utcnow,
)
from storage.errors import (
    AdapterExists,
    AdapterNotFound,
    BaseModelNotFound,
    InUse,
    InvalidName,
    NotFound,
)
from storage.names import AdapterRef, validate_name

READY, PENDING, DELETED = "ready", "pending", "deleted"
MIN_TOKEN_LIFETIME_S = 60  # shorter ones expire before a client could use them
DEFAULT_MAX_PRIORITY = 0  # every tenant equal until an admin raises a namespace's maximum


# -- conversions (rows never leave this module) ---------------------------------------------
def _ns(row: NamespaceRow) -> Namespace:
    max_priority = row.max_priority if row.max_priority is not None else DEFAULT_MAX_PRIORITY
    return Namespace(row.id, row.name, row.max_concurrent_jobs, row.max_gpus, row.max_cpus,
                     max_priority)  # fmt: skip


def _base(row: BaseModelRow) -> BaseModel:
    stored = sorted((row.files or {}).items())
    files = tuple(FileDigest(name, f["sha256"], int(f["size"])) for name, f in stored)
    shapes = {k: tuple(v) for k, v in (row.tensor_shapes or {}).items()}
    return BaseModel(
        row.id, row.name, row.source, row.architecture, row.parameter_count, row.fingerprint,
        files, shapes,
    )  # fmt: skip


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


# -- namespaces and tokens ----------------------------------------------------------------------
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


def token_digest(token: str) -> str:
    """What the catalog stores for a token: its SHA-256 (tokens are high-entropy secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    db: Catalog,
    *,
    namespace: str,
    name: str,
    scope: str = "write",
    expires_in_s: float | None = None,
    not_after: datetime | None = None,
) -> str:
    """Create a bearer token for ``namespace``; returns the only copy of the plaintext (the
    catalog keeps its SHA-256). ``scope``: read (list and download), write (also submit,
    cancel, upload, promote, delete), admin (also manage the namespace's tokens).
    ``not_after``: the latest the token may expire (its maker's own expiry)."""
    validate_name(name, kind="token name")
    validate_name(namespace, kind="namespace")
    if scope not in TOKEN_SCOPES:
        raise InvalidName(f"invalid scope {scope!r}: use one of {', '.join(TOKEN_SCOPES)}")
    if expires_in_s is not None and not expires_in_s >= MIN_TOKEN_LIFETIME_S:
        raise InvalidName(f"a token's lifetime must be at least {MIN_TOKEN_LIFETIME_S} s")
    expires = utcnow() + timedelta(seconds=expires_in_s) if expires_in_s is not None else None
    if not_after is not None:  # a token made by an expiring one ends no later than it
        cap = not_after if not_after.tzinfo else not_after.replace(tzinfo=UTC)
        expires = cap if expires is None else min(expires, cap)
    token = "lf_" + secrets.token_urlsafe(32)
    with db.session() as s:
        ns = _namespace_row(s, namespace, create=True)
        s.add(ApiTokenRow(namespace_id=ns.id, name=name, token_sha256=token_digest(token),
                          scope=scope, expires_at=expires))  # fmt: skip
    return token


def _token(row: ApiTokenRow, namespace: str) -> ApiToken:
    return ApiToken(row.id, namespace, row.name, row.scope, row.created_at, row.expires_at,
                    row.revoked_at)  # fmt: skip


def list_tokens(db: Catalog, *, namespace: str | None = None) -> list[ApiToken]:
    """Tokens (never their secrets), oldest first; revoked and expired ones included."""
    with db.session() as s:
        q = select(ApiTokenRow, NamespaceRow.name).join(NamespaceRow)
        if namespace is not None:
            q = q.where(NamespaceRow.name == namespace)
        return [_token(row, ns) for row, ns in s.execute(q.order_by(ApiTokenRow.id))]


def revoke_token(db: Catalog, *, token_id: int, namespace: str | None = None) -> ApiToken:
    """Revoke a token at once (idempotent). Raises ``NotFound`` (also for another namespace's
    token when ``namespace`` is given)."""
    with db.session() as s:
        q = select(ApiTokenRow, NamespaceRow.name).join(NamespaceRow)
        q = q.where(ApiTokenRow.id == token_id)
        if namespace is not None:
            q = q.where(NamespaceRow.name == namespace)
        found = s.execute(q).first()
        if found is None:
            raise NotFound(f"token {token_id} not found")
        row, ns = found
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        s.flush()
        return _token(row, ns)


def token_owner(db: Catalog, *, token: str) -> ApiToken | None:
    """The live (neither revoked nor expired) token with this secret, or None."""
    with db.session() as s:
        found = s.execute(
            select(ApiTokenRow, NamespaceRow.name)
            .join(NamespaceRow)
            .where(
                ApiTokenRow.token_sha256 == token_digest(token), ApiTokenRow.revoked_at.is_(None)
            )
        ).first()
        if found is None:
            return None
        row, ns = found
        expires = row.expires_at
        if expires is not None and expires.tzinfo is None:  # SQLite drops the zone: it is UTC
            expires = expires.replace(tzinfo=UTC)
        if expires is not None and expires <= utcnow():
            return None
        return _token(row, ns)


# -- base models ---------------------------------------------------------------
def register_base_model(
    db: Catalog,
    *,
    name: str,
    source: str,
    architecture: str,
    parameter_count: int,
    fingerprint: str,
    files: Iterable[FileDigest] = (),
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
) -> BaseModel:
    """Register a base (idempotent for the same fingerprint).

    A base registered before bases lived in the object store (no ``files``) gets its stored
    files recorded by the next registration of the same bytes.

    Raises:
        AdapterExists: the name is taken by a base with another fingerprint.
    """
    validate_name(name, kind="base model name")
    manifest = {f.name: {"sha256": f.sha256, "size": f.size} for f in files}
    shapes = {k: list(v) for k, v in (tensor_shapes or {}).items()}
    with db.session() as s:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is not None:
            if row.fingerprint != fingerprint:
                raise AdapterExists(
                    f"base model {name!r} is already registered with another fingerprint "
                    f"({row.fingerprint[:12]}…, this one {fingerprint[:12]}…)"
                )
            if manifest and not row.files:
                row.files, row.tensor_shapes = manifest, shapes
                s.flush()
            return _base(row)
        row = BaseModelRow(
            name=name,
            source=source,
            architecture=architecture,
            parameter_count=parameter_count,
            fingerprint=fingerprint,
            files=manifest or None,
            tensor_shapes=shapes or None,
        )
        s.add(row)
        s.flush()
        return _base(row)


def get_base_model(db: Catalog, *, name: str) -> BaseModel:
    """Raises ``BaseModelNotFound``."""
    with db.session() as s:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is None:
            raise BaseModelNotFound(f"base model {name!r} is not registered")
        return _base(row)


def list_base_models(db: Catalog) -> list[BaseModel]:
    with db.session() as s:
        return [_base(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.name))]


# -- adapter versions -----------------------------------------------------------------------
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
