"""Tinker's REST protocol under ``/api/v1``: the door for the ``tinker`` SDK and its cookbook.

Point ``tinker.ServiceClient(base_url="http://HOST:PORT", api_key="tml-" + TOKEN)`` at
``lorafleet server``. The key is ``tml-`` and a lorafleet token: its namespace owns the
sessions, models, checkpoints and published sampler weights (another namespace's are not
found); a read-only token is refused. This module only translates HTTP: the sessions and their
work are ``orchestrator.tinker.service``'s, the bytes ``orchestrator.tinker.wire``'s.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from orchestrator.tinker import wire
from orchestrator.tinker.service import LONG_POLL_S, TinkerService, UserError
from storage.auth import Principal, Unauthorized, authenticate
from storage.registry import Registry
from storage.settings import Settings

log = logging.getLogger(__name__)

PROTO = "application/x-protobuf"
MAX_BODY = 64 << 20
KEY_PREFIX = "tml-"
DEFAULT_NAMESPACE = "default"  # the admin token's sessions


def _error(status: int, message: str) -> JSONResponse:
    # every 4xx carries a body: the SDK retries an empty-bodied 400
    return JSONResponse({"error": {"message": message, "field": None}, "detail": message},
                        status)  # fmt: skip


def tinker_router(registry: Registry, settings: Settings, admin: str | None) -> APIRouter:
    """The Tinker routes over one ``TinkerService`` (created with the app)."""
    service = TinkerService(registry, settings)
    router = APIRouter(prefix="/api/v1", tags=["tinker"])
    router.service = service  # type: ignore[attr-defined]  # tests and shutdown reach it

    def caller(request: Request) -> Principal:
        key = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization") or ""
        token = key.removeprefix(KEY_PREFIX) if key.startswith(KEY_PREFIX) else None
        if token is None and bearer.lower().startswith("bearer "):
            token = bearer[7:].strip().removeprefix(KEY_PREFIX)
        try:
            who = authenticate(registry.catalog, admin, f"Bearer {token}" if token else None)
        except Unauthorized as exc:
            raise UserError(str(exc), 401) from None
        if request.method != "GET" and not who.can_write:
            raise UserError("this token is read-only: training and sampling need a write token",
                            403)  # fmt: skip
        return who

    def namespace(who: Principal) -> str:
        return who.namespace or DEFAULT_NAMESPACE

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise UserError("request body too large", 413)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise UserError("the body is not JSON") from None
        if not isinstance(data, dict):
            raise UserError("the body is a JSON object")
        return data

    def handle(fn: Any) -> Any:
        async def route(request: Request) -> Response:
            try:
                who = caller(request)
                return await fn(request, namespace(who))
            except UserError as exc:
                return _error(exc.status, str(exc))
            except wire.WireError as exc:
                return _error(400, str(exc))
            except Exception:
                log.exception("tinker %s failed", request.url.path)
                return _error(500, "internal error; see the server's log")

        return route

    def future(rid: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"request_id": rid, **extra})

    # -- client and sessions ----------------------------------------------------------------
    async def client_config(request: Request, ns: str) -> Response:
        # plain httpx transport; forward_backward chunks in order (one model's requests run
        # in seq_id order here anyway)
        return JSONResponse({"use_pyqwest_transport": False, "parallel_fwdbwd_chunks": False,
                             "proto_compress_fwdbwd": False})  # fmt: skip

    async def capabilities(request: Request, ns: str) -> Response:
        names = sorted(service.aliases) + [b.name for b in _bases(registry)]
        return JSONResponse(
            {
                "supported_models": [
                    {"model_name": n, "trainable": True, "sampleable": True} for n in names
                ]
            }
        )

    async def create_session(request: Request, ns: str) -> Response:
        await body_json(request)
        return JSONResponse({"type": "create_session", "session_id": service.create_session(ns)})

    async def heartbeat(request: Request, ns: str) -> Response:
        service.heartbeat((await body_json(request)).get("session_id"), ns)
        return JSONResponse({"type": "session_heartbeat"})

    async def telemetry(request: Request, ns: str) -> Response:
        return JSONResponse({"status": "accepted"})

    async def finish(request: Request, ns: str) -> Response:
        service.finish(request.path_params["session_id"], ns)
        return JSONResponse({"type": "finish"})

    # -- training ----------------------------------------------------------------------------
    async def create_model(request: Request, ns: str) -> Response:
        rid, mid = service.create_model(ns, await body_json(request))
        return future(rid, model_id=mid)

    async def get_info(request: Request, ns: str) -> Response:
        m = service.model((await body_json(request)).get("model_id"), ns)
        return JSONResponse({"type": "get_info", "model_id": m.id, "model_name": m.requested,
                             "is_lora": True, "lora_rank": m.rank, "model_data": {
                                 "model_name": m.requested, "tokenizer_id": m.requested,
                                 "arch": "llama"}})  # fmt: skip

    async def forward_backward(request: Request, ns: str) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise UserError("request body too large", 413)
        if request.headers.get("content-encoding", "").lower() == "zstd":
            import zstandard

            try:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_BODY)
            except zstandard.ZstdError:
                raise UserError("the body is not zstd") from None
        if PROTO not in request.headers.get("content-type", ""):
            raise UserError(f"forward_backward takes {PROTO}")
        fb = wire.decode_forward_backward(raw)
        rid = service.ordered(ns, fb.model_id, fb.seq_id, "forward_backward", fb)
        return future(rid, model_id=fb.model_id)

    def ordered_json(kind: str) -> Any:
        async def route(request: Request, ns: str) -> Response:
            body = await body_json(request)
            payload: Any = body
            if kind == "save_state":
                payload = {"name": wire.checkpoint_name(body.get("path"))}
            rid = service.ordered(ns, body.get("model_id"), body.get("seq_id"), kind, payload)
            return future(rid, model_id=body.get("model_id"))

        return route

    async def save_for_sampler(request: Request, ns: str) -> Response:
        body = await body_json(request)
        return future(service.save_weights_for_sampler(ns, body), model_id=body.get("model_id"))

    async def load_weights(request: Request, ns: str) -> Response:
        rid, mid = service.load_weights(ns, await body_json(request))
        return future(rid, model_id=mid)

    # -- sampling ----------------------------------------------------------------------------
    async def create_sampling_session(request: Request, ns: str) -> Response:
        sid = service.create_sampling_session(ns, await body_json(request))
        return JSONResponse({"type": "create_sampling_session", "sampling_session_id": sid})

    async def get_sampler(request: Request, ns: str) -> Response:
        s = service.sampler(request.path_params["sampler_id"], ns)
        return JSONResponse({"sampler_id": s.id, "base_model": s.requested,
                             "model_path": s.model_path})  # fmt: skip

    async def asample(request: Request, ns: str) -> Response:
        rid, ids = service.sample(ns, await body_json(request))
        return future(rid, sample_sequence_ids=ids)

    # -- futures -----------------------------------------------------------------------------
    async def retrieve(request: Request, ns: str) -> Response:
        f = service.future((await body_json(request)).get("request_id"))
        if not await f.wait(LONG_POLL_S):
            return JSONResponse({"type": "try_again", "request_id": f.id,
                                 "queue_state": "active"})  # fmt: skip
        if f.error is not None:
            return JSONResponse({"error": f.error, "category": f.category})
        if f.proto is not None and PROTO in request.headers.get("accept", ""):
            return Response(f.proto, media_type=PROTO)
        return JSONResponse(f.json or {})

    routes: list[tuple[str, str, Any]] = [
        ("POST", "/client/config", client_config),
        ("GET", "/get_server_capabilities", capabilities),
        ("POST", "/create_session", create_session),
        ("POST", "/session_heartbeat", heartbeat),
        ("POST", "/telemetry", telemetry),
        ("POST", "/sessions/{session_id}/finish", finish),
        ("POST", "/create_model", create_model),
        ("POST", "/get_info", get_info),
        ("POST", "/forward_backward", forward_backward),
        ("POST", "/optim_step", ordered_json("optim_step")),
        ("POST", "/save_weights", ordered_json("save_state")),
        ("POST", "/save_weights_for_sampler", save_for_sampler),
        ("POST", "/load_weights", load_weights),
        ("POST", "/create_sampling_session", create_sampling_session),
        ("GET", "/samplers/{sampler_id}", get_sampler),
        ("POST", "/asample", asample),
        ("POST", "/retrieve_future", retrieve),
    ]
    for method, path, fn in routes:
        router.add_api_route(path, handle(fn), methods=[method], include_in_schema=False)
    return router


def _bases(registry: Registry) -> list[Any]:
    from storage.catalog import repository as repo

    return list(repo.list_base_models(registry.catalog))
