"""``/v1/fine_tuning/jobs``: submit, list (paged), show, cancel, events (paged or streamed) and
checkpoints, shaped like OpenAI's fine-tuning API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.http_errors import ApiError
from orchestrator.job_errors import DETAIL_EVENT
from orchestrator.lifecycle import TERMINAL, IllegalTransition
from orchestrator.objects import checkpoint_object, event_object, job_object
from orchestrator.service import cancel_job, submit_job
from orchestrator.spec import JobSpec
from storage.auth import Principal, Unauthorized, authenticate
from storage.catalog import jobs
from storage.catalog.db import Catalog
from storage.errors import NotFound

MAX_ID = 2**63 - 1  # event ids are 64-bit columns
STREAM_RECHECK_S = 5.0  # an open event stream checks its token again this often
MAX_STREAMS_PER_TOKEN = 8
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "A page of events; with stream=true (or Accept: text/event-stream) the "
        "events as they come, then an `end` event",
    }
}


def page_body(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """A list page as OpenAI answers one."""
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}  # fmt: skip


class StreamCount:
    """Open event streams per bearer token, capped (a client that opens streams and never
    reads them holds server tasks and catalog polls)."""

    def __init__(self, limit: int = MAX_STREAMS_PER_TOKEN) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, key: str) -> bool:
        if self._open.get(key, 0) >= self.limit:
            return False
        self._open[key] = self._open.get(key, 0) + 1
        return True

    def close(self, key: str) -> None:
        left = self._open.get(key, 1) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)


def jobs_router(db: Catalog, principal: PrincipalDep, admin: str | None = None) -> APIRouter:
    """The job routes over ``db``; ``principal`` is the auth dependency, ``admin`` the admin
    token (event streams check their token again as they run)."""
    router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["jobs"], responses=schemas.ERRORS)
    streams = StreamCount()

    def still_valid(authorization: str) -> bool:
        try:
            authenticate(db, admin, authorization)
        except Unauthorized:
            return False
        return True

    def visible_job(job_id: str, who: Principal) -> jobs.Job:
        try:
            job = jobs.get_job(db, job_id=job_id)
        except NotFound:
            raise ApiError(404, f"job {job_id} not found") from None
        if not who.can_see(job.namespace):
            raise ApiError(404, f"job {job_id} not found")
        return job

    def adapter_of(job: jobs.Job) -> str | None:
        found = jobs.list_events(db, job_id=job.id, kinds=["adapter"], limit=1)
        return str(found[0].data.get("ref")) if found else None

    @router.post("", status_code=201, response_model=schemas.Job,
                 responses={200: {"model": schemas.Job,
                                  "description": "The job an earlier request with this "
                                  "Idempotency-Key created"}})  # fmt: skip
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

    @router.get("", response_model=schemas.JobPage)
    def list_jobs(
        namespace: str | None = Query(None, max_length=64),
        state: str | None = Query(None, max_length=32),
        limit: int = Query(20, ge=1, le=100),
        after: str | None = Query(None, max_length=64, description="The last id of a page."),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return page_body([], False)
            namespace = who.namespace
        states = [state] if state else None
        try:
            page, more = jobs.page_jobs(db, namespace=namespace, states=states, limit=limit,
                                        after=after)  # fmt: skip
        except NotFound:
            raise ApiError(400, f"after: no job {after} to continue from", "after") from None
        last = jobs.latest_events(db, job_ids=[j.id for j in page], kind="metrics")
        return page_body([job_object(j, last_metrics=last.get(j.id)) for j in page], more)

    @router.get("/{job_id}", response_model=schemas.Job)
    def get_job(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        job = visible_job(job_id, who)
        last = jobs.latest_events(db, job_ids=[job.id], kind="metrics").get(job.id)
        return job_object(job, adapter_of(job), last)

    @router.post("/{job_id}/cancel", response_model=schemas.Job)
    def cancel(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        job = visible_job(job_id, who)
        try:
            return job_object(cancel_job(db, job_id=job.id))
        except (IllegalTransition, jobs.JobStateConflict) as exc:
            raise ApiError(409, str(exc), "status") from None

    @router.get("/{job_id}/events", response_model=schemas.EventPage, responses=STREAMED)
    def events(
        job_id: str,
        request: Request,
        stream: bool = False,
        after: int = Query(0, ge=0, le=MAX_ID, description="The last event id seen."),
        limit: int = Query(100, ge=1, le=1000),
        who: Principal = Depends(principal),
    ) -> Any:
        job = visible_job(job_id, who)
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            key = request.headers.get("authorization", "")
            if not streams.open(key):
                raise ApiError(429, f"this token has {streams.limit} event streams open; "
                               "close one first")  # fmt: skip
            return StreamingResponse(sse(job.id, after, who, key), media_type="text/event-stream")
        found = jobs.list_events(db, job_id=job.id, after_id=after, limit=limit + 1)
        data = [event_object(e) for e in found[:limit] if shown(e, who)]
        return {"object": "list", "data": data, "has_more": len(found) > limit}

    def shown(e: jobs.JobEvent, who: Principal) -> bool:
        """A failure's detail (server paths, store URIs) is for admin tokens only."""
        return e.kind != DETAIL_EVENT or who.scope == "admin"

    async def sse(job_id: str, after: int, who: Principal, key: str) -> AsyncIterator[str]:
        last, checked = after, time.monotonic()
        try:
            while True:
                batch = await asyncio.to_thread(jobs.list_events, db, job_id=job_id,
                                                after_id=last)  # fmt: skip
                for e in batch:
                    last = e.id
                    if shown(e, who):
                        body = json.dumps(event_object(e))
                        yield f"id: {e.id}\nevent: {e.kind}\ndata: {body}\n\n"
                state = (await asyncio.to_thread(jobs.get_job, db, job_id=job_id)).state
                if state in TERMINAL and not batch:
                    yield f"event: end\ndata: {json.dumps({'status': state})}\n\n"
                    return
                if time.monotonic() - checked >= STREAM_RECHECK_S:  # revoked or expired: end
                    checked = time.monotonic()
                    if not await asyncio.to_thread(still_valid, key):
                        yield f"event: end\ndata: {json.dumps({'status': 'unauthorized'})}\n\n"
                        return
                await asyncio.sleep(0.25)
        finally:
            streams.close(key)

    @router.get("/{job_id}/checkpoints", response_model=schemas.CheckpointList)
    def checkpoints(job_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        """The checkpoints the job's training recorded in the catalog, newest first."""
        job = visible_job(job_id, who)
        found = [checkpoint_object(job.id, e)
                 for e in jobs.iter_events(db, job_id=job.id, kinds=["checkpoint"])]  # fmt: skip
        return {"object": "list", "data": found[::-1]}

    return router
