"""What every route shares: who is calling (the bearer token and its scope) and how errors
become ``{"error": {"message", "field"}}`` answers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.http_errors import ApiError
from orchestrator.spec import IdempotencyKeyError, SpecError
from storage.auth import Principal, Unauthorized, authenticate
from storage.catalog.db import Catalog
from storage.errors import (
    CatalogUnavailable,
    IntegrityError,
    InUse,
    NotFound,
    ObjectNotFound,
    ObjectStoreUnavailable,
    StorageError,
)

log = logging.getLogger(__name__)

PrincipalDep = Callable[..., Principal]


def principal_dependency(db: Catalog, admin: str | None) -> PrincipalDep:
    """The dependency every route but ``/health`` takes: the caller, or a 401/403."""

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

    return principal


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
    if isinstance(exc, InUse):
        return 409, str(exc)
    return 400, str(exc)


def _error(status: int, message: str, field: str | None = None, **kw: object) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status, **kw)  # type: ignore[arg-type]


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the routes let through to the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")]
        # a wrong body as a whole (not an object) is named by where it is: "body"
        field = ".".join(loc) or (str(err["loc"][0]) if err["loc"] else "body")
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        return _error(422, f"{field}: {msg}" if field else msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # a 400 here is a body that is not JSON at all (a wrong route or method has no field)
        field = "body" if exc.status_code == 400 else None
        return _error(exc.status_code, str(exc.detail), field, headers=exc.headers)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        status, message = storage_status(exc)
        if status >= 500:  # the detail (store URIs, server paths) stays in the server's log
            log.error("request failed: %s", exc)
        headers = {"Retry-After": "5"} if status == 503 else None  # an outage: come back
        return _error(status, message, headers=headers)

    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError) -> JSONResponse:
        status = 400 if isinstance(exc, IdempotencyKeyError) else 422
        return _error(status, str(exc), exc.field)
