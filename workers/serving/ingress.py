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
    engine_failure,
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
    return request.scope.get("state", {}).get("request_id")


class _RequestGuard:
    """Pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task and a queue per
    request and per streamed chunk): gives every request an id and refuses a POST body that is
    too large, or of no declared length, before anything reads it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # Ray Serve's proxy gives every request an id (the client's X-Request-Id, or its own)
        # and returns it in the response; outside Serve the app makes one
        given = headers.get(REQUEST_ID.lower())
        rid = given or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        if scope["method"] == "POST":
            declared = headers.get("content-length")
            problem = None
            if declared is None and "chunked" in headers.get("transfer-encoding", ""):
                problem = (411, "a request must declare its Content-Length")
            elif declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                problem = (413, f"the body is {int(declared):,} bytes (limit {MAX_BODY_BYTES:,})")
            if problem is not None:
                body = error_body(problem[1], problem[0])
                response = JSONResponse(body, problem[0], headers={REQUEST_ID: rid})
                await response(scope, receive, send)
                return

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start" and given is None:
                message.setdefault("headers", []).append(
                    (REQUEST_ID.lower().encode(), rid.encode())
                )
            await send(message)

        await self.app(scope, receive, send_with_id)


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

    app.add_middleware(_RequestGuard)
    return app


app = _app()


class Service:
    """What the routes call: a ``Frontend`` and either this process's engine (``host``) or a
    handle to the model server replicas (``server``). Plain Python but for the handle."""

    def __init__(self, opts: ServeOptions, server: DeploymentHandle | None) -> None:
        self.front = Frontend(opts)
        self.server: Any = server  # None: this process holds the engine
        self.host: Any = None
        if server is None:
            from workers.serving.host import EngineHost

            self.host = EngineHost(opts, host_adapters=opts.host_adapters)
        self.flusher = Periodic(self._flush_usage, opts.usage_flush_s,
                                "lorafleet-usage-flush").start()  # fmt: skip

    def close(self) -> None:
        """The last usage counts go to the catalog; the engine stops."""
        self.flusher.stop()
        if self.host is not None:
            self.host.close()

    def _flush_usage(self) -> None:
        catalog = self.front.registry.catalog
        self.front.meter.flush(lambda counts: usage_store.add_usage(catalog, counts))

    async def who(self, authorization: str | None) -> Principal:
        cached = self.front.who_cached(authorization)  # no thread hop when it is known
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.front.who, authorization)

    async def admin(self, authorization: str | None, what: str) -> None:
        if (await self.who(authorization)).namespace is not None:
            raise RequestFailed("forbidden", f"{what} need the admin token")

    async def writer(self, authorization: str | None) -> Principal:
        """Loading and unloading change a replica: a read-only token may not."""
        who = await self.who(authorization)
        if not who.can_write:
            raise RequestFailed("forbidden", "this token is read-only: it may not load or unload")
        return who

    async def _run(self, p: Prepared) -> AsyncIterator[dict[str, Any]]:
        """The request's items (``streams.py``), from this process's engine or a model
        replica's; the first one (admission) is consumed here."""
        payload = {**p.payload, "adapter": p.adapter, "version": p.version}
        if self.host is not None:
            local = self.host.stream(payload)
            first = await local.__anext__()
            if "error" in first:
                raise engine_failure(first.get("kind"), str(first["error"]))
            return local
        handle = self.server.options(multiplexed_model_id=p.adapter or "", stream=True)
        # the exact version travels with the request: the replica does not resolve again
        gen = handle.generate.remote(payload)
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
            raise engine_failure(first.get("kind"), str(first["error"]))
        return gen

    async def answer(self, request: Request, body: CompletionRequest | ChatCompletionRequest,
                     authorization: str | None, *, chat: bool) -> Any:  # fmt: skip
        who = await self.who(authorization)
        # resolving may query the catalog and tokenizing a long prompt takes a while: neither
        # on the event loop (a short request whose model is resolved already is prepared here)
        if self.front.prepares_quickly(body):
            p = self.front.prepare(body, who, chat=chat)
        else:
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

    async def load(self, namespace: str, ref: str, authorization: str | None) -> dict:
        who = await self.writer(authorization)
        version = await asyncio.to_thread(self.front.target, f"{namespace}/{ref}", who)
        adapter = version.ref if version else ""
        try:
            if self.host is not None:
                engine = self.host.engine
                slot = await asyncio.to_thread(engine.warm, adapter) if adapter else -1
                return {"adapter": adapter, "slot": slot,
                        "host": engine.stats()["host"]["resident"]}  # fmt: skip
            return dict(await self.server.options(multiplexed_model_id=adapter).load.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        except Exception as exc:  # the replica's error, in the log; a generic 502 outside
            raise RequestFailed("corrupt", f"could not load {adapter}: {exc}") from None

    async def unload(self, namespace: str, ref: str, authorization: str | None) -> dict:
        who = await self.writer(authorization)
        version = await asyncio.to_thread(self.front.target, f"{namespace}/{ref}", who)
        adapter = version.ref if version else ""
        if self.host is not None:
            unloaded = bool(adapter) and bool(
                await asyncio.to_thread(self.host.engine.unload, adapter, disk=True)
            )
            return {"adapter": adapter, "unloaded": unloaded}
        handle = self.server.options(multiplexed_model_id=adapter)
        try:
            unloaded = bool(await handle.unload.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None
        return {"adapter": adapter, "unloaded": unloaded}

    async def stats(self, authorization: str | None) -> dict:
        await self.admin(authorization, "serving stats")
        if self.host is not None:
            return dict(self.host.engine.stats())
        try:
            return dict(await self.server.stats.remote())
        except REPLICA_GONE as exc:
            raise replica_gone(exc) from None


_SERVICE: list[Service] = []  # the one this process serves (a replica is one process)


def register(service: Service) -> None:
    """Make ``service`` the one the routes call. (The deployments call this through an import
    of this module: Serve ships a deployment class by value, with copies of the globals it
    names, so ``_SERVICE`` written from inside the class would be a copy.)"""
    _SERVICE.append(service)


def _service() -> Service:
    if not _SERVICE:
        raise RequestFailed("unavailable", "the server is starting")
    return _SERVICE[-1]


# -- routes (plain functions: served by Ray Serve's proxy or by uvicorn in the replica) -----
# (no `from __future__ import annotations` in this module: FastAPI must see real annotations
# on the routes to read the request bodies)
@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok", "base": _service().front.opts.base_name}


@app.get("/v1/openapi.json")
async def openapi(authorization: str | None = Header(default=None)) -> dict:
    """This app's OpenAPI schema, for the admin token (as the REST API serves its own)."""
    await _service().admin(authorization, "the schema")
    return app.openapi()


@app.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest,
                      authorization: str | None = Header(default=None)) -> Any:  # fmt: skip
    return await _service().answer(request, body, authorization, chat=False)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest,
                           authorization: str | None = Header(default=None)) -> Any:  # fmt: skip
    return await _service().answer(request, body, authorization, chat=True)


@app.get("/v1/models")
async def models(authorization: str | None = Header(default=None)) -> dict[str, Any]:
    svc = _service()
    who = await svc.who(authorization)
    return await asyncio.to_thread(svc.front.models, who)


@app.post("/v1/adapters/{namespace}/{ref}/load")
async def load(namespace: str, ref: str,
               authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
    return await _service().load(namespace, ref, authorization)


@app.post("/v1/adapters/{namespace}/{ref}/unload")
async def unload(namespace: str, ref: str,
                 authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
    return await _service().unload(namespace, ref, authorization)


@app.get("/v1/serving/stats")
async def stats(authorization: str | None = Header(default=None)) -> dict:
    return await _service().stats(authorization)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress:
    """The app behind Ray Serve's HTTP proxy: with ``server`` (a handle to the model server
    replicas) it routes each request to the replica holding its adapter; without, this replica
    holds the engine itself."""

    def __init__(self, server: DeploymentHandle | None, options_json: str) -> None:
        from workers.serving import ingress  # this module itself, not a shipped copy

        self.service = ingress.Service(ServeOptions.model_validate_json(options_json), server)
        ingress.register(self.service)

    def __del__(self) -> None:  # Serve shuts the replica down: the last counts go now
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=2)
class DirectServer:
    """The whole app in one replica that answers HTTP itself (uvicorn in the replica, on the
    address ``lorafleet serve`` was given): no proxy, and no remote call per request or per
    streamed chunk. Ray Serve still watches it and starts it again if it dies."""

    def __init__(self, options_json: str, host: str, port: int) -> None:
        import threading

        import uvicorn

        from workers.serving import ingress  # this module itself, not a shipped copy

        self.service = ingress.Service(ServeOptions.model_validate_json(options_json), None)
        ingress.register(self.service)
        config = uvicorn.Config(ingress.app, host=host, port=port, log_level="warning",
                                timeout_keep_alive=65, access_log=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorafleet-http",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the HTTP server thread has stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
        service = getattr(self, "service", None)
        if service is not None:
            service.close()
