"""The REST API: fine-tuning jobs (shaped like OpenAI's) and the adapter catalog.

Every route but ``GET /health`` needs a bearer token. A namespace token sees and touches only
its namespace — another namespace's jobs and adapters are 404, as if they did not exist; the
admin token (``LORAFLEET_API_TOKEN``) sees everything. Errors are ``{"error": {"message",
"field"}}`` with a 4xx status; HTTP exists only in this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api_files import UploadGuard, files_router
from orchestrator.http_errors import ApiError
from orchestrator.lifecycle import TERMINAL, IllegalTransition
from orchestrator.objects import adapter_object, event_object, job_object, token_object
from orchestrator.service import cancel_job, submit_job
from orchestrator.spec import IdempotencyKeyError, JobSpec, SpecError
from storage.auth import Principal, Unauthorized, authenticate
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.catalog.domain import AdapterVersion
from storage.errors import (
    CatalogUnavailable,
    IntegrityError,
    InvalidName,
    NotFound,
    ObjectNotFound,
    ObjectStoreUnavailable,
    StorageError,
)
from storage.registry import Registry
from storage.settings import Settings


class TokenBody(BaseModel):
    """A token to create: its namespace, a name, a scope and an optional lifetime."""

    namespace: str
    name: str
    scope: str = "write"
    expires_in_s: float | None = Field(None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False)


class PromoteBody(BaseModel):
    alias: str


log = logging.getLogger(__name__)


def storage_status(exc: StorageError) -> tuple[int, str]:
    """The status and the message a caller sees for a storage error.

    Faults of the server's own stores are 5xx with a generic message: their text names buckets,
    endpoints or server paths, which a caller must not see.
    """
    if isinstance(exc, ObjectNotFound | IntegrityError):
        return 502, "stored bytes are missing or corrupt; the operator has been told"
    if isinstance(exc, ObjectStoreUnavailable | CatalogUnavailable):
        return 503, "storage is unavailable; try again shortly"
    if isinstance(exc, NotFound):
        return 404, str(exc)
    return 400, str(exc)


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The API app over the configured catalog and object store."""
    reg = registry or Registry.from_settings(settings)
    db = reg.catalog
    admin = settings.api_token.get_secret_value() if settings.api_token else None
    # The schema is served behind the token like everything else (only /health is open).
    app = FastAPI(title="lorafleet", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "field": exc.field}}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        return JSONResponse(
            {"error": {"message": f"{field}: {msg}" if field else msg, "field": field}}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc.detail), "field": None}}, exc.status_code)

    def principal(request: Request, authorization: str | None = Header(default=None)) -> Principal:
        try:
            who = authenticate(db, admin, authorization)
        except Unauthorized as exc:
            raise ApiError(401, str(exc)) from None
        # the one place scopes are enforced: a read token lists, shows and downloads (GET);
        # every POST or DELETE changes something and needs a write token
        if request.method not in ("GET", "HEAD") and not who.can_write:
            raise ApiError(403, "this token is read-only: it may list and download, not change")
        return who

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        if not who.can_manage_tokens(body.namespace):
            raise ApiError(403, f"this token may not manage namespace {body.namespace}'s tokens")
        try:
            secret = repo.create_token(
                db, namespace=body.namespace, name=body.name, scope=body.scope,
                expires_in_s=body.expires_in_s,
            )  # fmt: skip
        except InvalidName as exc:
            field = "scope" if "scope" in str(exc) else "name"
            raise ApiError(422, str(exc), field) from None
        owner = repo.token_owner(db, token=secret)
        assert owner is not None
        return token_object(owner, secret)

    @app.get("/v1/tokens")
    def list_tokens(namespace: str | None = None, who: Principal = Depends(principal)) -> dict:
        scope = namespace if who.namespace is None else who.namespace
        if not who.can_manage_tokens(scope):
            raise ApiError(403, "listing tokens needs an admin token")
        data = [token_object(t) for t in repo.list_tokens(db, namespace=scope)]
        return {"object": "list", "data": data}

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(token_id: int, who: Principal = Depends(principal)) -> dict[str, Any]:
        if not who.can_manage_tokens(who.namespace):
            raise ApiError(403, "revoking tokens needs an admin token")
        try:
            return token_object(repo.revoke_token(db, token_id=token_id, namespace=who.namespace))
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None

    def visible_job(job_id: str, who: Principal) -> jobs.Job:
        try:
            job = jobs.get_job(db, job_id=job_id)
        except NotFound:
            raise ApiError(404, f"job {job_id} not found") from None
        if not who.can_see(job.namespace):
            raise ApiError(404, f"job {job_id} not found")
        return job

    def adapter_of(job: jobs.Job) -> str | None:
        for e in jobs.list_events(db, job_id=job.id):
            if e.kind == "adapter":
                return str(e.data.get("ref"))
        return None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/openapi.json")
    def openapi(who: Principal = Depends(principal)) -> dict[str, Any]:
        return app.openapi()

    @app.post("/v1/fine_tuning/jobs", status_code=201)
    def create_job(
        spec: JobSpec,
        who: Principal = Depends(principal),
        idempotency_key: str | None = Header(default=None, max_length=128),
    ) -> JSONResponse:
        if not who.can_see(spec.namespace):
            raise ApiError(403, f"token may not submit to namespace {spec.namespace}", "namespace")
        try:
            result = submit_job(db, spec, idempotency_key=idempotency_key)
        except jobs.IdempotencyConflict as exc:
            raise ApiError(409, str(exc), "idempotency_key") from None
        return JSONResponse(job_object(result.job), 201 if result.created else 200)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(
        namespace: str | None = None,
        state: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        after: str | None = Query(None, max_length=64, description="The last id of a page."),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return {"object": "list", "data": [], "has_more": False}
            namespace = who.namespace
        states = [state] if state else None
        try:
            page, more = jobs.page_jobs(db, namespace=namespace, states=states, limit=limit,
                                        after=after)  # fmt: skip
        except NotFound:
            raise ApiError(400, f"after: no job {after} to continue from", "after") from None
        data = [job_object(j) for j in page]
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}  # fmt: skip

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        job = visible_job(job_id, who)
        return job_object(job, adapter_of(job))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        job = visible_job(job_id, who)
        try:
            return job_object(cancel_job(db, job_id=job.id))
        except (IllegalTransition, jobs.JobStateConflict) as exc:
            raise ApiError(409, str(exc), "status") from None

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=None)
    def events(
        job_id: str,
        request: Request,
        stream: bool = False,
        after: int = Query(0, ge=0, le=2**63 - 1),  # an event id: a 64-bit column
        who: Principal = Depends(principal),
    ) -> dict[str, Any] | StreamingResponse:
        job = visible_job(job_id, who)
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(sse(job.id, after), media_type="text/event-stream")
        data = [event_object(e) for e in jobs.list_events(db, job_id=job.id, after_id=after)]
        return {"object": "list", "data": data}

    async def sse(job_id: str, after: int) -> AsyncIterator[str]:
        last = after
        while True:
            batch = await asyncio.to_thread(jobs.list_events, db, job_id=job_id, after_id=last)
            for e in batch:
                last = e.id
                yield f"id: {e.id}\nevent: {e.kind}\ndata: {json.dumps(event_object(e))}\n\n"
            state = (await asyncio.to_thread(jobs.get_job, db, job_id=job_id)).state
            if state in TERMINAL and not batch:
                yield f"event: end\ndata: {json.dumps({'status': state})}\n\n"
                return
            await asyncio.sleep(0.25)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        """The checkpoints the job's training recorded in the catalog, newest first."""
        job = visible_job(job_id, who)
        found = [
            {"object": "fine_tuning.job.checkpoint", "id": f"ckpt-{e.id}",
             "fine_tuning_job_id": job.id, "step_number": e.data.get("step"),
             "uri": e.data.get("uri"), "created_at": int(e.ts.timestamp())}
            for e in jobs.list_events(db, job_id=job.id) if e.kind == "checkpoint"
        ]  # fmt: skip
        return {"object": "list", "data": found[::-1]}

    app.include_router(files_router(reg, settings.max_upload_bytes, principal))
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes)

    # -- the adapter catalog -------------------------------------------------------------------
    def resolve_visible(namespace: str, ref: str, who: Principal) -> AdapterVersion:
        if not who.can_see(namespace):
            raise ApiError(404, f"adapter {namespace}/{ref} not found")
        try:
            return reg.resolve(f"{namespace}/{ref}")
        except InvalidName as exc:
            raise ApiError(400, str(exc), "ref") from None
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None

    @app.get("/v1/adapters")
    def list_adapters(
        namespace: str | None = None,
        base_model: str | None = None,
        tag: str | None = None,
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return {"object": "list", "data": []}
            namespace = who.namespace
        versions = reg.list(namespace=namespace, base_model=base_model, tag=tag)
        return {"object": "list", "data": [adapter_object(v) for v in versions]}

    @app.get("/v1/adapters/{namespace}/{ref}")
    def show_adapter(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        return adapter_object(resolve_visible(namespace, ref, who))

    @app.post("/v1/adapters/{namespace}/{ref}/promote")
    def promote(
        namespace: str, ref: str, body: PromoteBody, who: Principal = Depends(principal)
    ) -> dict[str, Any]:
        v = resolve_visible(namespace, ref, who)
        try:
            return adapter_object(reg.promote(v.ref, body.alias))
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None

    @app.delete("/v1/adapters/{namespace}/{ref}")
    def delete_adapter(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        v = resolve_visible(namespace, ref, who)
        return adapter_object(reg.delete(v.ref))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        status, message = storage_status(exc)
        if status >= 500:  # the detail (store URIs, server paths) stays in the server's log
            log.error("request failed: %s", exc)
        headers = {"Retry-After": "5"} if status == 503 else None  # an outage: come back
        return JSONResponse({"error": {"message": message, "field": None}}, status,
                            headers=headers)  # fmt: skip

    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError) -> JSONResponse:
        status = 400 if isinstance(exc, IdempotencyKeyError) else 422
        return JSONResponse({"error": {"message": str(exc), "field": exc.field}}, status)

    return app
