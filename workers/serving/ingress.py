"""The OpenAI-compatible HTTP ingress of the serving app (a Ray Serve FastAPI deployment).

A thin shell: every decision is ``Frontend``'s (``frontend.py``, plain Python). ``model`` is
the served base's name or an adapter reference (``ns/name``, ``ns/name:3``,
``ns/name@alias``); the ingress resolves it to an exact version (short TTL), calls a replica
with that version as its multiplexed model id, and answers in OpenAI's shapes with the exact
version in ``model`` and the digests of the bytes that answered in the
``X-Lorafleet-Adapter-Sha256`` / ``X-Lorafleet-Base-Sha256`` headers and
``system_fingerprint``. Bearer tokens work as in the REST API: a namespace token sees only its
namespace (others' adapters are 404), ``LORAFLEET_API_TOKEN`` is the admin; ``GET /health`` is
open. Every response has an ``X-Request-Id``; a 5xx body says only what kind of failure it was
and that id, the detail going to the log.

Every answered request is metered here, with the token counts its ``usage`` field returns:
per exact adapter version (or the base) and namespace, in memory, flushed to the catalog's
per-minute buckets every ``usage_flush_s`` (``workers.serving.metering``).
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.auth import Principal
from storage.catalog import usage as usage_store
from workers.serving.frontend import (
    Frontend,
    Prepared,
    RequestFailed,
    public_message,
    status_of,
)
from workers.serving.metering import Periodic
from workers.serving.openai_api import (
    MAX_BODY_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    error_param,
)
from workers.serving.options import ServeOptions

RETRY_AFTER_S = 1  # what a 429 or 503 asks a client to wait: a few decode steps
REQUEST_ID = "X-Request-Id"
__all__ = ["HttpError", "OpenAIIngress", "app", "status_of"]


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# A model server replica that died (killed, its node lost) or is being replaced: the request
# cannot finish there; the client may retry at once (Serve starts a new replica).
REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError, ReplicaUnavailableError,
                                                 DeploymentUnavailableError)  # fmt: skip
ADMISSION_TIMEOUT_S = 60.0  # longest wait for a replica to take a request: then a 503


def replica_gone(exc: BaseException) -> RequestFailed:
    """The failure of a request whose model server replica went away."""
    return RequestFailed("unavailable", f"the model server replica went away ({exc!r})", "model")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _app() -> FastAPI:
    app = FastAPI(title="lorafleet serving", docs_url=None, redoc_url=None, openapi_url=None)

    def _error(request: Request, status: int, message: str, param: str | None) -> JSONResponse:
        rid = _request_id(request)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
        body = error_body(public_message(status, message, rid), status, param)
        return JSONResponse(body, status, headers=headers)

    @app.exception_handler(HttpError)
    async def _err(request: Request, exc: HttpError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.param)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, exc: RequestFailed) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        # a wrong body as a whole (not an object) is named by where it is: "body"
        param = error_param(err["loc"], msg) or (str(err["loc"][0]) if err["loc"] else "body")
        text = msg if msg.startswith(f"{param}: ") else f"{param}: {msg}"
        return _error(request, 400, text, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # a 400 here is a body that is not JSON at all (a wrong route or method has no param)
        param = "body" if exc.status_code == 400 else None
        response = _error(request, exc.status_code, str(exc.detail), param)
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.middleware("http")
    async def _request_guard(request: Request, call_next: Any) -> Any:
        # Ray Serve's proxy gives every request an id (the client's X-Request-Id, or its own)
        # and returns it in the response; outside Serve the app makes one
        given = request.headers.get(REQUEST_ID)
        rid = given or uuid.uuid4().hex[:16]
        request.state.request_id = rid
        # a body is parsed before any field check: refuse an oversized one before reading it
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared is None and "chunked" in request.headers.get("transfer-encoding", ""):
                return _error(request, 411, "a request must declare its Content-Length", None)
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                message = f"the body is {int(declared):,} bytes (limit {MAX_BODY_BYTES:,})"
                return _error(request, 413, message, None)
        response = await call_next(request)
        if given is None:
            response.headers[REQUEST_ID] = rid
        return response

    return app


app = _app()


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress:
    """The HTTP front of the serving app (``Frontend`` holds its logic)."""

    def __init__(self, server: DeploymentHandle, options_json: str) -> None:
        self.front = Frontend(ServeOptions.model_validate_json(options_json))
        self.server = server
        self.flusher = Periodic(self._flush_usage, self.front.opts.usage_flush_s,
                                "lorafleet-usage-flush").start()  # fmt: skip

    def __del__(self) -> None:  # Serve shuts the replica down: the last counts go now
        flusher = getattr(self, "flusher", None)
        if flusher is not None:
            flusher.stop()

    def _flush_usage(self) -> None:
        catalog = self.front.registry.catalog
        self.front.meter.flush(lambda counts: usage_store.add_usage(catalog, counts))

    # -- helpers ---------------------------------------------------------------------------
    # (no `from __future__ import annotations` in this module: FastAPI must see real
    # annotations on the routes to read the request bodies)
    async def _who(self, authorization: str | None) -> Principal:
        return await asyncio.to_thread(self.front.who, authorization)

    async def _admin(self, authorization: str | None, what: str) -> None:
        if (await self._who(authorization)).namespace is not None:
            raise RequestFailed("forbidden", f"{what} need the admin token")

    async def _writer(self, authorization: str | None) -> Principal:
        """Loading and unloading change a replica: a read-only token may not."""
        who = await self._who(authorization)
        if not who.can_write:
            raise RequestFailed("forbidden", "this token is read-only: it may not load or unload")
        return who

    async def _run(self, p: Prepared) -> DeploymentResponseGenerator:
        handle = self.server.options(multiplexed_model_id=p.adapter or "", stream=True)
        # the exact version travels with the request: the replica does not resolve again
        gen = handle.generate.remote({**p.payload, "adapter": p.adapter, "version": p.version})
        assert isinstance(gen, DeploymentResponseGenerator)
        try:  # the first item comes at admission (or a 429 first): never wait forever
            first = await asyncio.wait_for(gen.__anext__(), ADMISSION_TIMEOUT_S)
        except TimeoutError:
            gen.cancel()
            raise RequestFailed("unavailable", "no model server replica admitted the request "
                                f"in {ADMISSION_TIMEOUT_S:.0f} s", "model") from None  # fmt: skip
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        if "error" in first:
            raise RequestFailed(first.get("kind") or "internal", str(first["error"]), "model")
        return gen

    async def _answer(self, request: Request, body: CompletionRequest | ChatCompletionRequest,
                      authorization: str | None, *, chat: bool) -> Any:  # fmt: skip
        who = await self._who(authorization)
        # resolving may query the catalog and tokenizing a long prompt takes a while: neither
        # on the event loop
        p = await asyncio.to_thread(self.front.prepare, body, who, chat=chat)
        gen = await self._run(p)
        headers = p.provenance.headers()
        if p.stream:
            rid = _request_id(request)

            async def items() -> AsyncIterator[dict[str, Any]]:
                try:
                    async for item in gen:
                        yield item
                except REPLICA_GONE as exc:  # mid-stream: the stream ends with why
                    failed = replica_gone(exc)
                    yield {"error": failed.message, "kind": failed.kind}

            events = self.front.events(p, items(), who, rid)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        results: list[Any] | None = None
        try:
            async for item in gen:
                if "results" in item:
                    results = item["results"]
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        if results is None:
            raise RequestFailed("internal", "the model server ended the request without results")
        body_out = self.front.answer(p, results)
        self.front.count(p, who, body_out["usage"]["prompt_tokens"],
                         body_out["usage"]["completion_tokens"])  # fmt: skip
        return JSONResponse(body_out, headers=headers)

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok", "base": self.front.opts.base_name}

    @app.get("/v1/openapi.json")
    async def openapi(self, authorization: str | None = Header(default=None)) -> dict:
        """This app's OpenAPI schema, for the admin token (as the REST API serves its own)."""
        await self._admin(authorization, "the schema")
        return app.openapi()

    @app.post("/v1/completions")
    async def completions(self, request: Request, body: CompletionRequest,
                          authorization: str | None = Header(default=None)) -> Any:  # fmt: skip
        return await self._answer(request, body, authorization, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        self, request: Request, body: ChatCompletionRequest,
        authorization: str | None = Header(default=None),
    ) -> Any:  # fmt: skip
        return await self._answer(request, body, authorization, chat=True)

    @app.get("/v1/models")
    async def models(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        who = await self._who(authorization)
        return await asyncio.to_thread(self.front.models, who)

    @app.post("/v1/adapters/{namespace}/{ref}/load")
    async def load(self, namespace: str, ref: str,
                   authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
        who = await self._writer(authorization)
        version = await asyncio.to_thread(self.front.target, f"{namespace}/{ref}", who)
        adapter = version.ref if version else ""
        handle = self.server.options(multiplexed_model_id=adapter)
        try:
            return dict(await handle.load.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        except Exception as exc:  # the replica's error, in the log; a generic 502 outside
            raise RequestFailed("corrupt", f"could not load {adapter}: {exc}") from None

    @app.post("/v1/adapters/{namespace}/{ref}/unload")
    async def unload(self, namespace: str, ref: str,
                     authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
        who = await self._writer(authorization)
        version = await asyncio.to_thread(self.front.target, f"{namespace}/{ref}", who)
        adapter = version.ref if version else ""
        handle = self.server.options(multiplexed_model_id=adapter)
        try:
            unloaded = bool(await handle.unload.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        return {"adapter": adapter, "unloaded": unloaded}

    @app.get("/v1/serving/stats")
    async def stats(self, authorization: str | None = Header(default=None)) -> dict:
        await self._admin(authorization, "serving stats")
        try:
            return dict(await self.server.stats.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
