"""The catalog schema: SQLAlchemy 2 typed models. Rows never leave ``storage.catalog``."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class NamespaceRow(Base):
    """A team: owns adapters, jobs and API tokens."""

    __tablename__ = "namespaces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_gpus: Mapped[float | None] = mapped_column(Float)
    max_cpus: Mapped[float | None] = mapped_column(Float)
    max_priority: Mapped[int | None] = mapped_column(Integer)  # None: DEFAULT_MAX_PRIORITY
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiTokenRow(Base):
    """A bearer token scoped to a namespace; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(8), default="write", server_default="write")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BaseModelRow(Base):
    """A base model an adapter can be tied to, identified by a content fingerprint."""

    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(128))
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    # {file name: {"sha256", "size"}}: the base's bytes in the object store, content-addressed
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # {tensor name: shape}: lets any node check an adapter against the base without its bytes
    tensor_shapes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FileRow(Base):
    """An uploaded data file (``file-…``): validated, content-addressed, namespace-scoped."""

    __tablename__ = "files"
    # one record per content per namespace (uploading the same bytes again returns it)
    __table_args__ = (
        Index("ix_files_namespace_sha256", "namespace_id", "sha256", unique=True),
        Index("ix_files_created", "created_at", "id"),  # keyset pages, newest first
        Index("ix_files_namespace_created", "namespace_id", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    """A fine-tuning job and its lifecycle (driven by the orchestrator)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("namespace_id", "idempotency_key"),
        Index("ix_jobs_state_priority", "state", "priority", "created_at"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_namespace_created", "namespace_id", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_failures: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    status_reason: Mapped[str | None] = mapped_column(Text)
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    # the pack it trains in now (None: alone); a pack's jobs share one worker group
    pack_id: Mapped[str | None] = mapped_column(ForeignKey("packs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class PackRow(Base):
    """Jobs on one base training in one worker group (one batched forward per micro-step).

    ``open`` while it takes joiners; its runner closes it before its workers stop, under the
    row's lock, so a job can never join a pack that will not train it.
    """

    __tablename__ = "packs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    pack_key: Mapped[str] = mapped_column(String(256), index=True)
    state: Mapped[str] = mapped_column(String(16))  # open | closed
    max_slots: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEventRow(Base):
    """A timestamped job event: a state transition or a metrics report."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class AdapterRepoRow(Base):
    """One adapter name in a namespace; ``last_version`` hands out consecutive versions."""

    __tablename__ = "adapter_repos"
    __table_args__ = (UniqueConstraint("namespace_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    name: Mapped[str] = mapped_column(String(64))
    last_version: Mapped[int] = mapped_column(Integer, default=0)


class AdapterVersionRow(Base):
    """An immutable adapter version with its lineage, bytes and digests."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("repo_id", "version"),
        Index("ix_adapter_versions_repo_state", "repo_id", "state", "version"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("adapter_repos.id"))
    version: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    dataset_sha256: Mapped[str | None] = mapped_column(String(64))
    r: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[Any]] = mapped_column(JSON)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    method: Mapped[str] = mapped_column(String(16), default="lora", server_default="lora")
    object_prefix: Mapped[str] = mapped_column(Text)
    files: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    # per layer: singular values of scaling·B·A, ranks keeping 90 % / 99 % of the energy
    spectrum: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    repo: Mapped[AdapterRepoRow] = relationship(lazy="joined")
    base_model: Mapped[BaseModelRow] = relationship(lazy="joined")
    tags: Mapped[list[AdapterTagRow]] = relationship(lazy="selectin", cascade="all, delete-orphan")


class AdapterTagRow(Base):
    """A free-form tag on an adapter version (indexed for filtering)."""

    __tablename__ = "adapter_tags"
    version_id: Mapped[int] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class AliasRow(Base):
    """``namespace/name@alias`` → one version; moved atomically by an UPDATE."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("repo_id", "alias"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("adapter_repos.id"))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class PublishLeaseRow(Base):
    """A publish in flight: gc keeps the objects under ``prefix`` while the lease exists."""

    __tablename__ = "publish_leases"
    prefix: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UsageBucketRow(Base):
    """Served requests and tokens of one model (an exact adapter version, or the base) in one
    namespace in one minute; replicas add their counts in batches, never a write per request."""

    __tablename__ = "usage_buckets"
    __table_args__ = (Index("ix_usage_buckets_model_minute", "model", "minute"),)
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class AliasGateRow(Base):
    """A rule a version must pass before ``alias`` may point at it (``eval_loss<=0.5``)."""

    __tablename__ = "alias_gates"
    __table_args__ = (UniqueConstraint("repo_id", "alias", "rule"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("adapter_repos.id"))
    alias: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CatalogEventRow(Base):
    """What happened to an adapter: promotions (forced ones too), gate changes."""

    __tablename__ = "catalog_events"
    __table_args__ = (Index("ix_catalog_events_repo_id", "repo_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("adapter_repos.id"))
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class ServingReplicaRow(Base):
    """The last snapshot a serving replica wrote of itself: tiers, load latencies, queue."""

    __tablename__ = "serving_replicas"
    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    base: Mapped[str] = mapped_column(String(64))
    node: Mapped[str | None] = mapped_column(String(128))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
