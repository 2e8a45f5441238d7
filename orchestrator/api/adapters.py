"""``/v1/adapters``: the adapter catalog — list (paged), show, promote an alias, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.api.jobs import page_body
from orchestrator.http_errors import ApiError
from orchestrator.objects import adapter_object
from storage.auth import Principal
from storage.catalog import repository as repo
from storage.catalog.domain import AdapterVersion
from storage.errors import InvalidName, NotFound
from storage.names import parse_ref
from storage.registry import Registry


def adapters_router(reg: Registry, principal: PrincipalDep) -> APIRouter:
    """The catalog routes over ``reg``; ``principal`` is the auth dependency."""
    router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=schemas.ERRORS)

    def resolve_visible(namespace: str, ref: str, who: Principal) -> AdapterVersion:
        if not who.can_see(namespace):
            raise ApiError(404, f"adapter {namespace}/{ref} not found")
        try:
            return reg.resolve(f"{namespace}/{ref}")
        except InvalidName as exc:
            raise ApiError(400, str(exc), "ref") from None
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None

    @router.get("", response_model=schemas.AdapterPage)
    def list_adapters(
        namespace: str | None = Query(None, max_length=64),
        base_model: str | None = Query(None, max_length=64),
        tag: str | None = Query(None, max_length=128),
        limit: int = Query(20, ge=1, le=100),
        after: str | None = Query(None, max_length=200,
                                  description="The last id (namespace/name:version) of a page."),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:  # fmt: skip
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return page_body([], False)
            namespace = who.namespace
        try:
            cursor = parse_ref(after) if after is not None else None
        except InvalidName as exc:
            raise ApiError(400, f"after: {exc}", "after") from None
        try:
            page, more = repo.page_adapter_versions(reg.catalog, namespace=namespace,
                                                    base_model=base_model, tag=tag,
                                                    limit=limit, after=cursor)  # fmt: skip
        except NotFound:
            raise ApiError(400, f"after: no version {after} to continue from", "after") from None
        return page_body([adapter_object(v) for v in page], more)

    @router.get("/{namespace}/{ref}", response_model=schemas.Adapter)
    def show_adapter(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        return adapter_object(resolve_visible(namespace, ref, who))

    @router.post("/{namespace}/{ref}/promote", response_model=schemas.Adapter)
    def promote(
        namespace: str, ref: str, body: schemas.PromoteBody, who: Principal = Depends(principal)
    ) -> dict[str, Any]:
        v = resolve_visible(namespace, ref, who)
        try:
            return adapter_object(reg.promote(v.ref, body.alias))
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None

    @router.delete("/{namespace}/{ref}", response_model=schemas.Adapter)
    def delete_adapter(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        v = resolve_visible(namespace, ref, who)
        return adapter_object(reg.delete(v.ref))

    return router
