"""``/v1/tokens``: create, list and revoke API tokens (an admin token's business)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.http_errors import ApiError
from orchestrator.objects import token_object
from storage.auth import Principal
from storage.catalog import repository as repo
from storage.catalog.db import Catalog
from storage.errors import InvalidName, NotFound

MAX_ID = 2**63 - 1  # token ids are 64-bit columns


def tokens_router(db: Catalog, principal: PrincipalDep) -> APIRouter:
    """The token routes over ``db``; ``principal`` is the auth dependency."""
    router = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=schemas.ERRORS)

    @router.post("", status_code=201, response_model=schemas.NewToken)
    def create_token(body: schemas.TokenBody, who: Principal = Depends(principal)) -> dict:
        if not who.can_manage_tokens(body.namespace):
            raise ApiError(403, f"this token may not manage namespace {body.namespace}'s tokens")
        try:
            secret = repo.create_token(
                db, namespace=body.namespace, name=body.name, scope=body.scope,
                expires_in_s=body.expires_in_s,
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
