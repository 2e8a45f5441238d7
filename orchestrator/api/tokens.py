"""``/v1/tokens``: create, list and revoke API tokens (an admin token's business)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Path, Query

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.http_errors import ApiError
from orchestrator.objects import token_object
from storage.auth import Principal, scope_rank
from storage.catalog import repository as repo
from storage.catalog.db import Catalog
from storage.catalog.repository import MIN_TOKEN_LIFETIME_S
from storage.errors import InvalidName, NotFound

MAX_ID = 2**63 - 1  # token ids are 64-bit columns


def child_lifetime(parent: Principal, scope: str, expires_in_s: float | None) -> float | None:
    """The lifetime a token made by ``parent`` gets: never past the parent's own expiry (an
    expiring namespace admin mints expiring tokens), and never a wider scope.

    Raises:
        ApiError: 403 for a wider scope, 422 for a lifetime past the parent's.
    """
    if parent.namespace is None:  # the admin token: no bounds
        return expires_in_s
    if scope_rank(scope) > scope_rank(parent.scope):
        raise ApiError(403, f"a {parent.scope} token may not make a {scope} token", "scope")
    if parent.expires_at is None:
        return expires_in_s
    end = parent.expires_at if parent.expires_at.tzinfo else parent.expires_at.replace(
        tzinfo=UTC)  # fmt: skip
    left = (end - datetime.now(UTC)).total_seconds()
    if expires_in_s is None:
        expires_in_s = left
    if expires_in_s > left:
        raise ApiError(422, f"expires_in_s: past this token's own expiry (it has {left:.0f} s "
                       "left)", "expires_in_s")  # fmt: skip
    if expires_in_s < MIN_TOKEN_LIFETIME_S:
        raise ApiError(422, "expires_in_s: this token expires too soon to make others",
                       "expires_in_s")  # fmt: skip
    return expires_in_s


def tokens_router(db: Catalog, principal: PrincipalDep) -> APIRouter:
    """The token routes over ``db``; ``principal`` is the auth dependency."""
    router = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=schemas.ERRORS)

    @router.post("", status_code=201, response_model=schemas.NewToken)
    def create_token(body: schemas.TokenBody, who: Principal = Depends(principal)) -> dict:
        if not who.can_manage_tokens(body.namespace):
            raise ApiError(403, f"this token may not manage namespace {body.namespace}'s tokens")
        lifetime = child_lifetime(who, body.scope, body.expires_in_s)
        try:
            secret = repo.create_token(
                db, namespace=body.namespace, name=body.name, scope=body.scope,
                expires_in_s=lifetime, not_after=who.expires_at,
            )  # fmt: skip
        except InvalidName as exc:
            field = "scope" if "scope" in str(exc) else "name"
            if "namespace" in str(exc):
                field = "namespace"
            raise ApiError(422, str(exc), field) from None
        owner = repo.token_owner(db, token=secret)
        assert owner is not None
        return token_object(owner, secret)

    @router.get("", response_model=schemas.TokenList)
    def list_tokens(
        namespace: str | None = Query(None, max_length=64), who: Principal = Depends(principal)
    ) -> dict[str, Any]:
        scope = namespace if who.namespace is None else who.namespace
        if not who.can_manage_tokens(scope):
            raise ApiError(403, "listing tokens needs an admin token")
        data = [token_object(t) for t in repo.list_tokens(db, namespace=scope)]
        return {"object": "list", "data": data}

    @router.delete("/{token_id}", response_model=schemas.Token)
    def revoke_token(
        token_id: int = Path(ge=1, le=MAX_ID), who: Principal = Depends(principal)
    ) -> dict:
        if not who.can_manage_tokens(who.namespace):
            raise ApiError(403, "revoking tokens needs an admin token")
        try:
            return token_object(repo.revoke_token(db, token_id=token_id, namespace=who.namespace))
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None

    return router
