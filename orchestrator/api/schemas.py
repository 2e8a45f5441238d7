"""The REST API's request bodies, errors and lists, as ``/v1/openapi.json`` documents them.

The objects inside the lists (jobs, adapters, files, tokens, events, usage, replicas) are owned
by ``orchestrator.objects``, shared with the CLI's ``-o json``; they are re-exported here so the
routes name every response model from one module.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.objects import (  # noqa: F401  (re-exported for the routes)
    Adapter,
    CatalogEvent,
    Checkpoint,
    DataFile,
    Event,
    FileDeleted,
    Job,
    NewToken,
    Replica,
    Spectrum,
    Token,
    Usage,
)
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
class Page(_Out):
    """One page of a list, newest first; ask for the next with ``after=last_id``."""

    object: Literal["list"]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobPage(Page):
    data: list[Job]


class EventPage(_Out):
    """Events in order; ask for the next with ``after`` = the last id."""

    object: Literal["list"]
    data: list[Event]
    has_more: bool


class CheckpointList(_Out):
    object: Literal["list"]
    data: list[Checkpoint]


# -- adapters ------------------------------------------------------------------------------------
class AdapterPage(Page):
    data: list[Adapter]


# -- files ---------------------------------------------------------------------------------------
class DataFilePage(Page):
    data: list[DataFile]


class TokenList(_Out):
    object: Literal["list"]
    data: list[Token]


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


class CatalogEventList(_Out):
    object: Literal["list"]
    data: list[CatalogEvent]


# -- usage and serving ---------------------------------------------------------------------------
class UsageList(_Out):
    object: Literal["list"]
    group: Literal["model", "minute"]
    data: list[Usage]


class Serving(_Out):
    object: Literal["serving"]
    replicas: list[Replica]
