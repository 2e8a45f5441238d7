"""The REST API: fine-tuning jobs (shaped like OpenAI's), data files, the adapter catalog and
API tokens.

Every route but ``GET /health`` needs a bearer token. A namespace token sees and touches only
its namespace — another namespace's jobs and adapters are 404, as if they did not exist; the
admin token (``LORAFLEET_API_TOKEN``) sees everything. Errors are ``{"error": {"message",
"field"}}``; HTTP status codes exist only in this package.

- ``deps``: the caller (token and scope) and the error handlers
- ``schemas``: every request and response body (``/v1/openapi.json``, admin only)
- ``jobs``, ``files``, ``adapters``, ``tokens``, ``usage``: the routes
- ``tinker``: Tinker's training and sampling protocol under ``/api/v1`` (the ``tinker`` SDK)
- ``orchestrator.console``: the browser console at ``/`` (static files; data through the routes)
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI

from orchestrator.api import schemas
from orchestrator.api.adapters import adapters_router
from orchestrator.api.deps import install_error_handlers, principal_dependency
from orchestrator.api.files import UploadGuard, files_router
from orchestrator.api.jobs import jobs_router
from orchestrator.api.tinker import tinker_router
from orchestrator.api.tokens import tokens_router
from orchestrator.api.usage import usage_router
from orchestrator.console import mount_console
from storage.auth import Principal
from storage.registry import Registry
from storage.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The API app over the configured catalog and object store."""
    reg = registry or Registry.from_settings(settings)
    admin = settings.api_token.get_secret_value() if settings.api_token else None
    principal = principal_dependency(reg.catalog, admin)
    # The schema is served behind the token like everything else (only /health is open).
    app = FastAPI(title="lorafleet", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    install_error_handlers(app)

    @app.get("/health", response_model=schemas.Health, tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/openapi.json", tags=["health"], responses=schemas.ERRORS)
    def openapi(who: Principal = Depends(principal)) -> dict[str, Any]:
        """This API's OpenAPI schema (every route, request and response body)."""
        return app.openapi()

    @app.get("/v1/me", response_model=schemas.Me, tags=["health"], responses=schemas.ERRORS)
    def me(who: Principal = Depends(principal)) -> dict[str, Any]:
        """Who this token is: its namespace (null: the admin token) and scope."""
        return {"object": "principal", "namespace": who.namespace, "scope": who.scope}

    app.include_router(jobs_router(reg.catalog, principal, admin))
    app.include_router(
        files_router(
            reg,
            settings.max_upload_bytes,
            principal,
            max_line=settings.max_line_bytes,
            max_uploads=settings.max_uploads_per_namespace,
        )
    )
    app.include_router(adapters_router(reg, principal))
    app.include_router(tokens_router(reg.catalog, principal))
    app.include_router(usage_router(reg.catalog, principal))
    tinker = tinker_router(reg, settings, admin)
    app.include_router(tinker)
    app.state.tinker = tinker.service  # type: ignore[attr-defined]
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes)
    mount_console(app)
    return app
