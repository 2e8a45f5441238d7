"""The JSON shape of every object the API returns and ``lorafleet … -o json`` prints.

This module owns those shapes: each is a pydantic model (extra fields forbidden, every field
required unless it says otherwise) with the one function that builds it from the catalog's
records. The REST API (which documents them in ``/v1/openapi.json`` through
``orchestrator.api.schemas``) and the CLI call the same functions, so a script that reads one
reads the other, and a field added to a builder but not to its model fails on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # annotations only: the CLI imports this module without the ORM
    from storage.catalog import jobs, packs, promotion, usage
    from storage.catalog.domain import AdapterVersion, ApiToken
    from storage.catalog.domain import DataFile as DataFileRecord


class Shape(BaseModel):
    """An object as it leaves lorafleet: nothing beyond its declared fields."""

    # fields with defaults (``object``) are still always present, and the schema says so
    model_config = ConfigDict(
        extra="forbid", json_schema_serialization_defaults_required=True, defer_build=True
    )  # built at first use: the CLI starts faster


def _dump(shape: Shape) -> dict[str, Any]:
    return shape.model_dump()


def _ts(d: Any) -> float | None:
    return d.timestamp() if d is not None else None


def _its(d: Any) -> int | None:
    return int(d.timestamp()) if d is not None else None


# -- jobs ----------------------------------------------------------------------------------------
class Hyperparameters(Shape):
    lora: dict[str, Any] | None
    training: dict[str, Any] | None


class Job(Shape):
    """A fine-tuning job (OpenAI's field names where they fit)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    namespace: str
    name: str
    status: str
    status_reason: str | None
    model: str | None
    training_file: str | None
    validation_file: str | None
    hyperparameters: Hyperparameters
    method: dict[str, Any] = Field(
        description="OpenAI's method object: {type: supervised|dpo|reinforcement, …}."
    )
    init_adapter: str | None = Field(None, description="The adapter a warm start began from.")
    resources: dict[str, Any] | None
    priority: int
    attempts: int
    error: str | None
    fine_tuned_model: str | None
    pack_id: str | None = Field(description="The pack it trains in now (null: alone).")
    progress: dict[str, Any] | None = Field(
        None, description="Step, max_steps and loss of its newest metrics (in lists and show)."
    )
    created_at: int
    started_at: int | None
    finished_at: int | None


def job_object(
    job: jobs.Job, adapter: str | None = None, last_metrics: jobs.JobEvent | None = None
) -> dict[str, Any]:
    """A job as the API shows it; ``progress`` from its newest metrics event when the caller
    read it."""
    spec = job.spec
    max_steps = (spec.get("training") or {}).get("max_steps")
    progress = None
    if last_metrics is not None:
        progress = {"step": last_metrics.data.get("step"), "max_steps": max_steps,
                    "loss": last_metrics.data.get("loss")}  # fmt: skip
    return _dump(Job(
        id=job.id, namespace=job.namespace, name=job.name, status=job.state,
        status_reason=job.status_reason, model=spec.get("base_model"),
        training_file=spec.get("training_data"), validation_file=spec.get("validation_data"),
        hyperparameters=Hyperparameters(lora=spec.get("lora"), training=spec.get("training")),
        method=spec.get("method") or {"type": "supervised"},
        init_adapter=spec.get("init_adapter"), resources=spec.get("resources"),
        priority=job.priority, attempts=job.attempts,
        error=job.error, fine_tuned_model=adapter, pack_id=job.pack_id, progress=progress,
        created_at=int(job.created_at.timestamp()), started_at=_its(job.started_at),
        finished_at=_its(job.finished_at),
    ))  # fmt: skip


class Event(Shape):
    id: int
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: float
    type: str
    data: dict[str, Any]


def event_object(e: jobs.JobEvent) -> dict[str, Any]:
    """One event of a job (state changes, metrics, checkpoints)."""
    return _dump(Event(id=e.id, created_at=e.ts.timestamp(), type=e.kind, data=e.data))


class Checkpoint(Shape):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    fine_tuning_job_id: str
    step_number: int | None
    uri: str | None
    created_at: int


def checkpoint_object(job_id: str, e: jobs.JobEvent) -> dict[str, Any]:
    """A checkpoint a job's training recorded (from its ``checkpoint`` event)."""
    return _dump(Checkpoint(
        id=f"ckpt-{e.id}", fine_tuning_job_id=job_id, step_number=e.data.get("step"),
        uri=e.data.get("uri"), created_at=int(e.ts.timestamp()),
    ))  # fmt: skip


class PackSlots(Shape):
    used: int
    max: int
    free: int


class Pack(Shape):
    """Jobs on one base and in one namespace training in one worker group, and its slots."""

    id: str
    object: Literal["pack"] = "pack"
    state: str
    jobs: list[str]
    slots: PackSlots
    base_fingerprint: str
    created_at: int
    closed_at: int | None


def pack_object(p: packs.Pack) -> dict[str, Any]:
    """A pack and its slots."""
    return _dump(Pack(
        id=p.id, state=p.state, jobs=list(p.jobs),
        slots=PackSlots(used=len(p.jobs), max=p.max_slots, free=p.free_slots),
        base_fingerprint=p.pack_key.split("|", 1)[0], created_at=int(p.created_at.timestamp()),
        closed_at=_its(p.closed_at),
    ))  # fmt: skip


# -- adapters ------------------------------------------------------------------------------------
class BaseRef(Shape):
    name: str
    fingerprint: str


class LoraShape(Shape):
    r: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool
    method: Literal["lora", "dora", "adalora"] = "lora"


class Lineage(Shape):
    job_id: str | None
    dataset_sha256: str | None
    hyperparameters: dict[str, Any] | None
    created_by: str | None


class StoredFile(Shape):
    name: str
    sha256: str
    size: int


class Adapter(Shape):
    """An adapter version: ``id`` is its exact reference ``namespace/name:version``."""

    id: str
    object: Literal["adapter"] = "adapter"
    namespace: str
    name: str
    version: int
    state: str
    aliases: list[str]
    tags: list[str]
    base_model: BaseRef
    lora: LoraShape
    lineage: Lineage
    metrics: dict[str, Any] | None
    files: list[StoredFile]
    created_at: int | None


def adapter_object(v: AdapterVersion) -> dict[str, Any]:
    """An adapter version with its base, LoRA shape, lineage, metrics and files."""
    return _dump(Adapter(
        id=v.ref, namespace=v.namespace, name=v.name, version=v.version, state=v.state,
        aliases=list(v.aliases), tags=list(v.tags),
        base_model=BaseRef(name=v.base_model.name, fingerprint=v.base_model.fingerprint),
        lora=LoraShape(r=v.r, alpha=v.alpha, target_modules=v.target_modules,
                       use_rslora=v.use_rslora, method=v.method),
        lineage=Lineage(job_id=v.job_id, dataset_sha256=v.dataset_sha256,
                        hyperparameters=v.hyperparameters, created_by=v.created_by),
        metrics=v.metrics,
        files=[StoredFile(name=f.name, sha256=f.sha256, size=f.size) for f in v.files],
        created_at=_its(v.created_at),
    ))  # fmt: skip


class LayerSpectrum(Shape):
    module: str
    r: int
    singular_values: list[float] = Field(description="Of scaling·B·A, largest first.")
    rank_90: int = Field(description="The least rank keeping 90 % of the energy Σσ².")
    rank_99: int


class Spectrum(Shape):
    """An adapter version's spectrum: per layer, and the adapter's ranks (max over layers)."""

    id: str
    object: Literal["adapter.spectrum"] = "adapter.spectrum"
    r: int
    rank_90: int
    rank_99: int
    layers: list[LayerSpectrum]


def spectrum_object(v: AdapterVersion, spectrum: dict[str, Any]) -> dict[str, Any]:
    """A version's spectrum (as ``orchestrator.spectra.version_spectrum`` computes it)."""
    return _dump(Spectrum(id=v.ref, **spectrum))


class CatalogEvent(Shape):
    id: int
    object: Literal["adapter.event"] = "adapter.event"
    adapter: str
    created_at: float
    type: str
    alias: str | None
    version: int | None
    actor: str | None
    data: dict[str, Any]


def catalog_event_object(e: promotion.CatalogEvent) -> dict[str, Any]:
    """A promotion, gate change or delete of an adapter (forced ones say so in ``type``)."""
    return _dump(CatalogEvent(
        id=e.id, adapter=f"{e.namespace}/{e.name}", created_at=e.ts.timestamp(), type=e.kind,
        alias=e.alias, version=e.version, actor=e.actor, data=e.data,
    ))  # fmt: skip


# -- files ---------------------------------------------------------------------------------------
class DataFile(Shape):
    """An uploaded dataset (OpenAI's fields, plus namespace, rows and digest)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    namespace: str
    rows: int
    sha256: str
    created_at: int | None


def file_object(f: DataFileRecord) -> dict[str, Any]:
    """A file as the API shows it."""
    return _dump(DataFile(
        id=f.id, bytes=f.bytes, filename=f.filename, purpose=f.purpose, namespace=f.namespace,
        rows=f.rows, sha256=f.sha256, created_at=_its(f.created_at),
    ))  # fmt: skip


class FileDeleted(Shape):
    """What deleting a file answers (OpenAI's shape)."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_deleted_object(file_id: str) -> dict[str, Any]:
    """The answer to a file's deletion."""
    return _dump(FileDeleted(id=file_id, deleted=True))


# -- tokens --------------------------------------------------------------------------------------
class Token(Shape):
    """A token's record; its secret is never shown again after creation."""

    id: int
    object: Literal["token"] = "token"
    namespace: str
    name: str
    scope: str
    created_at: float | None
    expires_at: float | None
    revoked_at: float | None


class NewToken(Token):
    token: str = Field(description="The secret: shown once, stored only as its SHA-256.")


def token_object(t: ApiToken, secret: str | None = None) -> dict[str, Any]:
    """A token's record, with its secret only when it was just created."""
    fields = dict(id=t.id, namespace=t.namespace, name=t.name, scope=t.scope,
                  created_at=_ts(t.created_at), expires_at=_ts(t.expires_at),
                  revoked_at=_ts(t.revoked_at))  # fmt: skip
    if secret is not None:  # shown once, never stored
        return _dump(NewToken(**fields, token=secret))
    return _dump(Token(**fields))


# -- usage and serving ---------------------------------------------------------------------------
class Usage(Shape):
    """Requests and tokens one model served in one namespace (summed, or in one minute)."""

    object: Literal["usage"] = "usage"
    namespace: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    first_minute: int | None = None
    minute: int | None = None


def usage_object(u: usage.UsageCount, *, per_minute: bool = False) -> dict[str, Any]:
    """Served requests and tokens of one model in one namespace (in one minute, or summed)."""
    minute = {"minute" if per_minute else "first_minute": int(u.minute.timestamp())}
    return _dump(Usage(
        namespace=u.namespace, model=u.model, requests=u.requests,
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens, **minute,
    ))  # fmt: skip


class Replica(Shape):
    """A serving replica's last snapshot: what sits in which tier, load latencies, queue."""

    object: Literal["serving.replica"] = "serving.replica"
    id: str
    base: str
    node: str | None
    updated_at: float
    tiers: dict[str, Any]
    load_ms: dict[str, Any]
    counters: dict[str, Any]
    queue: dict[str, Any]
    prefix_cache: dict[str, Any]  # hits and misses (requests and tokens), tokens held


PREFIX_CACHE_FIELDS = ("enabled", "tokens", "hits", "misses", "hit_tokens", "miss_tokens",
                       "evicted_blocks")  # fmt: skip


def replica_object(r: usage.ReplicaSnapshot, namespace: str | None = None) -> dict[str, Any]:
    """A serving replica's last snapshot; a namespace token sees only its own adapters in it."""

    def mine(refs: list[str]) -> list[str]:
        return [x for x in refs if namespace is None or x.startswith(f"{namespace}/")]

    s = r.stats
    slots, host = s.get("slots", {}), s.get("host", {})
    return _dump(Replica(
        id=r.replica_id, base=r.base, node=r.node, updated_at=r.updated_at.timestamp(),
        tiers={"device": mine(list(slots.get("resident", []))),
               "host": mine(list(host.get("resident", []))),
               "device_slots": slots.get("n"), "host_capacity": host.get("capacity")},
        load_ms=s.get("load_ms", {}),
        counters={"slot_hits": slots.get("hits"), "slot_loads": slots.get("loads"),
                  "host_hits": host.get("hits"), "host_misses": host.get("misses"),
                  "disk_downloads": s.get("disk", {}).get("downloads")},
        queue=s.get("queue", {}),
        prefix_cache={k: v for k, v in s.get("prefix_cache", {}).items()
                      if k in PREFIX_CACHE_FIELDS},
    ))  # fmt: skip
