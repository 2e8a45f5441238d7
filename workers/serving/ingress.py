"""The OpenAI-compatible HTTP ingress of the serving app (a Ray Serve FastAPI deployment).

``model`` is the served base's name or an adapter reference (``ns/name``, ``ns/name:3``,
``ns/name@alias``). The ingress resolves it to an exact version (short TTL) and names that
version in the response's ``model`` field, so every answer carries its lineage. Bearer tokens
work as in the REST API: a namespace token sees only its namespace (others' adapters are 404),
``LORAFLEET_API_TOKEN`` is the admin; ``GET /health`` is open.

Every answered request is metered here, with the token counts its ``usage`` field returns:
per exact adapter version (or the base) and namespace, in memory, flushed to the catalog's
per-minute buckets every ``usage_flush_s`` (``workers.serving.metering``).
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.auth import Principal, Unauthorized, authenticate
from storage.catalog import usage as usage_store
from storage.catalog.domain import AdapterVersion
from storage.errors import InvalidName, NotFound, StorageError
from storage.fingerprint import fingerprint_model_dir
from storage.names import parse_ref
from storage.registry import Registry
from storage.settings import settings_on_node
from workers.base_model import load_base_config, load_tokenizer
from workers.serving.metering import Periodic, UsageMeter
from workers.serving.openai_api import (
    MAX_BODY_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    StreamFormatter,
    chat_prompt_ids,
    chat_response,
    completion_response,
    error_body,
    usage,
)
from workers.serving.options import ServeOptions
from workers.serving.resolver import RefResolver

# The one place an engine error kind becomes an HTTP status.
STATUS_OF_KIND = {"not_found": 404, "invalid": 400, "mismatch": 422, "busy": 503,
                  "overloaded": 429, "corrupt": 502, "internal": 500}  # fmt: skip
RETRY_AFTER_S = 1  # what a 429 or 503 asks a client to wait: a few decode steps


def status_of(kind: str | None) -> int:
    """The HTTP status of an engine error kind (unknown kinds are server errors)."""
    return STATUS_OF_KIND.get(kind or "internal", 500)


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# A model server replica that died (killed, its node lost) or is being replaced: the request
# cannot finish there; the client may retry at once (Serve starts a new replica).
REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError, ReplicaUnavailableError,
                                                 DeploymentUnavailableError)  # fmt: skip
ADMISSION_TIMEOUT_S = 60.0  # longest wait for a replica to take a request: then a 503


def replica_gone(exc: BaseException) -> HttpError:
    """The 503 for a request whose model server replica went away."""
    return HttpError(503, f"the model server replica went away ({type(exc).__name__}); retry",
                     "model")  # fmt: skip


def _app() -> FastAPI:
    app = FastAPI(title="lorafleet serving", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HttpError)
    async def _err(_: Request, exc: HttpError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
        return JSONResponse(error_body(exc.message, exc.status, exc.param), exc.status,
                            headers=headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "header")]
        # a wrong body as a whole (not an object) is named by where it is: "body"
        param = ".".join(loc) or (str(err["loc"][0]) if err["loc"] else "body")
        msg = str(err["msg"]).removeprefix("Value error, ")
        return JSONResponse(error_body(f"{param}: {msg}" if param else msg, 400, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # a 400 here is a body that is not JSON at all (a wrong route or method has no param)
        param = "body" if exc.status_code == 400 else None
        return JSONResponse(error_body(str(exc.detail), exc.status_code, param), exc.status_code,
                            headers=exc.headers)  # fmt: skip

    @app.middleware("http")
    async def _body_size(request: Request, call_next: Any) -> Any:
        # a body is parsed before any field check: refuse an oversized one before reading it
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared is None and "chunked" in request.headers.get("transfer-encoding", ""):
                return JSONResponse(error_body("a request must declare its Content-Length",
                                               411), 411)  # fmt: skip
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                message = f"the body is {int(declared):,} bytes (limit {MAX_BODY_BYTES:,})"
                return JSONResponse(error_body(message, 413), 413)
        return await call_next(request)

    return app


def ingress_class(opts: ServeOptions) -> Any:
    from ray import serve
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    app = _app()

    @serve.deployment(max_ongoing_requests=1024)
    @serve.ingress(app)
    class OpenAIIngress:
        def __init__(self, server: DeploymentHandle, options_json: str) -> None:
            self.opts = ServeOptions.model_validate_json(options_json)
            self.settings = settings_on_node(self.opts.settings_json)
            self.registry = Registry.from_settings(self.settings)
            base_dir = self.registry.base_dir(self.opts.base_name)
            token = self.settings.api_token
            self.admin = token.get_secret_value() if token else None
            self.server = server
            self.resolve = RefResolver(self.registry.resolve, ttl_s=self.opts.alias_ttl_s)
            self.tokenizer = load_tokenizer(base_dir)
            self.fingerprint = fingerprint_model_dir(base_dir).sha256
            config = load_base_config(base_dir)
            self.context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
            self.meter = UsageMeter()
            self.flusher = Periodic(self._flush_usage, self.opts.usage_flush_s,
                                    "lorafleet-usage-flush").start()  # fmt: skip

        def __del__(self) -> None:  # Serve shuts the replica down: the last counts go now
            flusher = getattr(self, "flusher", None)
            if flusher is not None:
                flusher.stop()

        def _flush_usage(self) -> None:
            self.meter.flush(lambda counts: usage_store.add_usage(self.registry.catalog, counts))

        def _meter(self, who: Principal, version: AdapterVersion | None,
                   result: dict[str, Any]) -> None:  # fmt: skip
            """Count an answered request (the numbers its ``usage`` field carries)."""
            if version is not None:
                namespace, model = version.namespace, version.ref
            else:  # the bare base: the caller's namespace ("" for the admin token)
                namespace, model = who.namespace or "", self.opts.base_name
            self.meter.add(namespace=namespace, model=model,
                           prompt_tokens=int(result["prompt_tokens"]),
                           completion_tokens=int(result["completion_tokens"]))  # fmt: skip

        # -- helpers ---------------------------------------------------------------------
        # (no `from __future__ import annotations` in this module: FastAPI must see real
        # annotations on the routes to read the request bodies)
        def _who(self, authorization: str | None) -> Principal:
            try:
                return authenticate(self.registry.catalog, self.admin, authorization)
            except Unauthorized as exc:
                raise HttpError(401, str(exc)) from None

        async def _writer(self, authorization: str | None) -> None:
            """Loading and unloading change a replica: a read-only token may not."""
            who = await asyncio.to_thread(self._who, authorization)
            if not who.can_write:
                raise HttpError(403, "this token is read-only: it may not load or unload")

        async def _resolve(self, model: str, authorization: str | None) -> AdapterVersion | None:
            """Authenticate and resolve off the event loop (both may query the catalog)."""
            who = await asyncio.to_thread(self._who, authorization)
            return await asyncio.to_thread(self._target, model, who)

        def _target(self, model: str, who: Principal) -> AdapterVersion | None:
            """The exact adapter version for ``model`` (None: the bare base)."""
            if model == self.opts.base_name:
                return None
            try:
                ref = parse_ref(model)
            except InvalidName as exc:
                raise HttpError(
                    404, f"model {model!r} is neither the served base ({self.opts.base_name}) "
                    f"nor an adapter reference: {exc}", "model") from None  # fmt: skip
            if not who.can_see(ref.namespace):
                raise HttpError(404, f"adapter {model} not found", "model")
            try:
                version = self.resolve(model)
            except NotFound as exc:
                raise HttpError(404, str(exc), "model") from None
            except StorageError as exc:
                raise HttpError(503, str(exc)) from None
            return version

        def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest,
                        chat: bool) -> list[int]:  # fmt: skip
            """The prompt's token ids, as the engine would make them from the text."""
            if chat:
                return chat_prompt_ids(self.tokenizer, body.messages)  # type: ignore[union-attr]
            return list(self.tokenizer(body.text())["input_ids"])  # type: ignore[union-attr]

        async def _run(
            self, version: AdapterVersion | None, payload: dict[str, Any]
        ) -> DeploymentResponseGenerator:
            adapter = version.ref if version else None
            handle = self.server.options(multiplexed_model_id=adapter or "", stream=True)
            # the exact version travels with the request: the replica does not resolve again
            gen = handle.generate.remote({**payload, "adapter": adapter, "version": version})
            assert isinstance(gen, DeploymentResponseGenerator)
            try:  # the first item comes at admission (or a 429 first): never wait forever
                first = await asyncio.wait_for(gen.__anext__(), ADMISSION_TIMEOUT_S)
            except TimeoutError:
                gen.cancel()
                raise HttpError(
                    503,
                    "no model server replica admitted the request in "
                    f"{ADMISSION_TIMEOUT_S:.0f} s; retry",
                    "model",
                ) from None
            except REPLICA_GONE as exc:
                raise replica_gone(exc) from None
            if "error" in first:
                raise HttpError(status_of(first.get("kind")), str(first["error"]), "model")
            return gen

        async def _answer(self, body: CompletionRequest | ChatCompletionRequest,
                          authorization: str | None, *, chat: bool) -> Any:  # fmt: skip
            who = await asyncio.to_thread(self._who, authorization)
            version = await asyncio.to_thread(self._target, body.model, who)
            # tokenizing a long prompt takes a while: never on the event loop
            prompt = await asyncio.to_thread(self._prompt_ids, body, chat)
            if len(prompt) + body.limit() > self.context:
                raise HttpError(400, f"the prompt ({len(prompt):,} tokens) plus max_tokens "
                                f"({body.limit():,}) exceed the model's context "
                                f"({self.context:,} tokens)", "max_tokens")  # fmt: skip
            payload = {"prompt": prompt, "max_tokens": body.limit(),
                       "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                       "stop": list(body.stops())}  # fmt: skip
            gen = await self._run(version, payload)
            name = version.ref if version else self.opts.base_name
            if body.stream:
                fmt = StreamFormatter(name, chat=chat)
                with_usage = bool(body.stream_options and body.stream_options.include_usage)

                async def events() -> AsyncIterator[str]:
                    try:
                        async for item in gen:
                            if "delta" in item:
                                yield fmt.delta(item["delta"])
                            elif "result" in item:
                                r = item["result"]
                                if r["error"]:
                                    yield fmt.delta("")  # the stream is open: end it, say why
                                    body = error_body(r["error"], status_of(r["kind"]))
                                    yield f"data: {json.dumps(body)}\n\n"
                                    return
                                self._meter(who, version, r)
                                counts = usage(r["prompt_tokens"], r["completion_tokens"])
                                yield fmt.finish(r["finish_reason"],
                                                 counts if with_usage else None)  # fmt: skip
                    except REPLICA_GONE as exc:  # mid-stream: end the stream, say why
                        yield fmt.delta("")
                        yield f"data: {json.dumps(error_body(replica_gone(exc).message, 503))}\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            result: dict[str, Any] | None = None
            try:
                async for item in gen:
                    if "result" in item:
                        result = item["result"]
            except REPLICA_GONE as exc:
                raise replica_gone(exc) from None
            if result is None:
                raise HttpError(500, "the model server ended the request without an answer")
            if result["error"]:
                raise HttpError(status_of(result["kind"]), str(result["error"]), "model")
            self._meter(who, version, result)
            build = chat_response if chat else completion_response
            return build(name, result["text"], result["finish_reason"], result["prompt_tokens"],
                         result["completion_tokens"])  # fmt: skip

        # -- routes ----------------------------------------------------------------------
        @app.get("/health")
        def health(self) -> dict[str, str]:
            return {"status": "ok", "base": self.opts.base_name}

        @app.get("/v1/openapi.json")
        async def openapi(self, authorization: str | None = Header(default=None)) -> dict:
            """This app's OpenAPI schema, for the admin token (as the REST API serves its own)."""
            if (await asyncio.to_thread(self._who, authorization)).namespace is not None:
                raise HttpError(403, "the schema needs the admin token")
            return app.openapi()

        @app.post("/v1/completions")
        async def completions(
            self, body: CompletionRequest, authorization: str | None = Header(default=None)
        ) -> Any:
            return await self._answer(body, authorization, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(
            self, body: ChatCompletionRequest, authorization: str | None = Header(default=None)
        ) -> Any:
            return await self._answer(body, authorization, chat=True)

        @app.get("/v1/models")
        def models(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
            who = self._who(authorization)
            now = int(time.time())
            data: list[dict[str, Any]] = []
            if self.opts.merged is None:
                data.append({"id": self.opts.base_name, "object": "model", "created": now,
                             "owned_by": "lorafleet"})  # fmt: skip
            for v in self.registry.list(namespace=who.namespace):
                if v.base_model.fingerprint != self.fingerprint:
                    continue
                if self.opts.merged is not None and v.ref != self.resolve(self.opts.merged).ref:
                    continue
                created = int(v.created_at.timestamp()) if v.created_at else now
                for name in (v.ref, *(f"{v.namespace}/{v.name}@{a}" for a in v.aliases)):
                    data.append({"id": name, "object": "model", "created": created,
                                 "owned_by": v.namespace, "root": v.ref,
                                 "parent": self.opts.base_name})  # fmt: skip
            return {"object": "list", "data": data}

        @app.post("/v1/adapters/{namespace}/{ref}/load")
        async def load(self, namespace: str, ref: str,
                       authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
            await self._writer(authorization)
            version = await self._resolve(f"{namespace}/{ref}", authorization)
            adapter = version.ref if version else ""
            handle = self.server.options(multiplexed_model_id=adapter)
            try:
                return dict(await handle.load.remote())
            except Exception as exc:  # the replica's error, shown to the caller
                raise HttpError(502, f"could not load {adapter}: {exc}") from None

        @app.post("/v1/adapters/{namespace}/{ref}/unload")
        async def unload(self, namespace: str, ref: str,
                         authorization: str | None = Header(default=None)) -> dict:  # fmt: skip
            await self._writer(authorization)
            version = await self._resolve(f"{namespace}/{ref}", authorization)
            adapter = version.ref if version else ""
            handle = self.server.options(multiplexed_model_id=adapter)
            try:
                unloaded = bool(await handle.unload.remote())
            except REPLICA_GONE as exc:
                raise replica_gone(exc) from None
            return {"adapter": adapter, "unloaded": unloaded}

        @app.get("/v1/serving/stats")
        async def stats(self, authorization: str | None = Header(default=None)) -> dict:
            if (await asyncio.to_thread(self._who, authorization)).namespace is not None:
                raise HttpError(403, "serving stats need the admin token")
            try:
                return dict(await self.server.stats.remote())
            except REPLICA_GONE as exc:
                raise replica_gone(exc) from None

    return OpenAIIngress
