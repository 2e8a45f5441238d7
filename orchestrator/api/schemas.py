"""The REST API's request and response bodies, as ``/v1/openapi.json`` documents them.

The shapes are built by ``orchestrator.objects`` (shared with the CLI's ``-o json``); these
models describe them for the schema and check them on the way out, so a change to one without
the other fails the API tests instead of surprising a client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.names import NAME_RE

NAME_PATTERN = NAME_RE.pattern  # a namespace, adapter, alias or token name


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ------------------------------------------------------------------------------------
class TokenBody(BaseModel):
    """A token to create: its namespace, a name, a scope and an optional lifetime."""

    model_config = ConfigDict(extra="forbid")
    namespace: str = Field(max_length=64, pattern=NAME_PATTERN)
    name: str = Field(max_length=64)
    scope: Literal["read", "write", "admin"] = "write"
    # at least a minute: shorter tokens would expire before anyone used them
    expires_in_s: float | None = Field(None, ge=60, le=10 * 365 * 86400, allow_inf_nan=False)


class PromoteBody(BaseModel):
    """The alias to point at a version; ``force`` (admin scope) passes a failing gate."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(max_length=64)
    force: bool = False


class RollbackBody(BaseModel):
    """Point an alias back at the version it pointed at before (through its gate)."""

    model_config = ConfigDict(extra="forbid")
    force: bool = False


class GateBody(BaseModel):
    """An alias's gate: every rule must pass (``eval_loss<=0.5``, ``eval_loss<=current+2%``)."""

    model_config = ConfigDict(extra="forbid")
    require: list[Annotated[str, Field(max_length=200)]] = Field(max_length=16)


# -- errors --------------------------------------------------------------------------------------
class ErrorDetail(_Out):
    message: str
    field: str | None = Field(description="The request field at fault, when one is.")


class ErrorBody(_Out):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "Bad request (the message and field say what)"),
        (401, "Missing, malformed, unknown, revoked or expired token"),
        (403, "The token may not do this"),
        (404, "Not found (or in another namespace)"),
        (409, "Conflicts with the current state"),
        (422, "A field is invalid (named in error.field)"),
        (503, "The catalog or object store is unavailable: retry after Retry-After seconds"),
    ]
}


class Health(_Out):
    status: Literal["ok"]


class Me(_Out):
    """The caller: a namespace token's namespace and scope (namespace null: the admin)."""

    object: Literal["principal"]
    namespace: str | None
    scope: str


# -- jobs ----------------------------------------------------------------------------------------
class Hyperparameters(_Out):
    lora: dict[str, Any] | None
    training: dict[str, Any] | None


class Job(_Out):
    """A fine-tuning job (OpenAI's field names where they fit)."""

    id: str
    object: Literal["fine_tuning.job"]
    namespace: str
    name: str
    status: str
    status_reason: str | None
    model: str | None
    training_file: str | None
    validation_file: str | None
    hyperparameters: Hyperparameters
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


class Page(_Out):
    """One page of a list, newest first; ask for the next with ``after=last_id``."""

    object: Literal["list"]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobPage(Page):
    data: list[Job]


class Event(_Out):
    id: int
    object: Literal["fine_tuning.job.event"]
    created_at: float
    type: str
    data: dict[str, Any]


class EventPage(_Out):
    """Events in order; ask for the next with ``after`` = the last id."""

    object: Literal["list"]
    data: list[Event]
    has_more: bool


class Checkpoint(_Out):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    fine_tuning_job_id: str
    step_number: int | None
    uri: str | None
    created_at: int


class CheckpointList(_Out):
    object: Literal["list"]
    data: list[Checkpoint]


# -- adapters ------------------------------------------------------------------------------------
class BaseRef(_Out):
    name: str
    fingerprint: str


class LoraShape(_Out):
    r: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool
    method: Literal["lora", "dora", "adalora"] = "lora"


class Lineage(_Out):
    job_id: str | None
    dataset_sha256: str | None
    hyperparameters: dict[str, Any] | None
    created_by: str | None


class StoredFile(_Out):
    name: str
    sha256: str
    size: int


class Adapter(_Out):
    """An adapter version: ``id`` is its exact reference ``namespace/name:version``."""

    id: str
    object: Literal["adapter"]
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


class AdapterPage(Page):
    data: list[Adapter]


# -- files ---------------------------------------------------------------------------------------
class DataFile(_Out):
    """An uploaded dataset (OpenAI's fields, plus namespace, rows and digest)."""

    id: str
    object: Literal["file"]
    bytes: int
    filename: str
    purpose: str
    status: Literal["processed"]
    namespace: str
    rows: int
    sha256: str
    created_at: int | None


class DataFilePage(Page):
    data: list[DataFile]


class FileDeleted(_Out):
    id: str
    object: Literal["file"]
    deleted: bool


# -- tokens --------------------------------------------------------------------------------------
class Token(_Out):
    """A token's record; its secret is never shown again after creation."""

    id: int
    object: Literal["token"]
    namespace: str
    name: str
    scope: str
    created_at: float | None
    expires_at: float | None
    revoked_at: float | None


class NewToken(Token):
    token: str = Field(description="The secret: shown once, stored only as its SHA-256.")


class TokenList(_Out):
    object: Literal["list"]
    data: list[Token]


class LayerSpectrum(_Out):
    module: str
    r: int
    singular_values: list[float] = Field(description="Of scaling·B·A, largest first.")
    rank_90: int = Field(description="The least rank keeping 90 % of the energy Σσ².")
    rank_99: int


class Spectrum(_Out):
    """An adapter version's spectrum: per layer, and the adapter's ranks (max over layers)."""

    id: str
    object: Literal["adapter.spectrum"]
    r: int
    rank_90: int
    rank_99: int
    layers: list[LayerSpectrum]


class IdleAdapter(_Out):
    adapter: Adapter
    last_used_at: int | None = Field(description="The last minute it served a request.")


class IdleAdapterList(_Out):
    """Ready versions with no traffic for ``days`` (least recently used first)."""

    object: Literal["list"]
    days: float
    data: list[IdleAdapter]


# -- gates and catalog events ----------------------------------------------------------------------
class Gates(_Out):
    """An adapter's gated aliases and their rules."""

    object: Literal["adapter.gates"]
    adapter: str
    gates: dict[str, list[str]]


class RuleResult(_Out):
    rule: str
    passed: bool
    value: float | None
    threshold: float | None
    message: str


class GateVerdict(_Out):
    """How a version would fare at an alias's gate now (``current``: the version in place)."""

    object: Literal["gate.verdict"]
    alias: str
    candidate: str
    current: str | None
    passed: bool
    results: list[RuleResult]


class CatalogEvent(_Out):
    id: int
    object: Literal["adapter.event"]
    adapter: str
    created_at: float
    type: str
    alias: str | None
    version: int | None
    actor: str | None
    data: dict[str, Any]


class CatalogEventList(_Out):
    object: Literal["list"]
    data: list[CatalogEvent]


# -- usage and serving ---------------------------------------------------------------------------
class Usage(_Out):
    """Requests and tokens one model served in one namespace (summed, or in one minute)."""

    object: Literal["usage"]
    namespace: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    first_minute: int | None = None
    minute: int | None = None


class UsageList(_Out):
    object: Literal["list"]
    group: Literal["model", "minute"]
    data: list[Usage]


class Replica(_Out):
    """A serving replica's last snapshot: what sits in which tier, load latencies, queue."""

    object: Literal["serving.replica"]
    id: str
    base: str
    node: str | None
    updated_at: float
    tiers: dict[str, Any]
    load_ms: dict[str, Any]
    counters: dict[str, Any]
    queue: dict[str, Any]
    prefix_cache: dict[str, Any]  # hits and misses (requests and tokens), tokens held


class Serving(_Out):
    object: Literal["serving"]
    replicas: list[Replica]
