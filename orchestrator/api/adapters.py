"""``/v1/adapters``: the adapter catalog — list (paged), show, idle versions, promote an alias
through its gate, roll it back, gates, the adapter's catalog events, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.api.jobs import page_body
from orchestrator.http_errors import ApiError
from orchestrator.objects import adapter_object, catalog_event_object, spectrum_object
from storage.auth import Principal
from storage.catalog import promotion, usage
from storage.catalog import repository as repo
from storage.catalog.domain import AdapterVersion
from storage.errors import InvalidName, NotFound
from storage.gates import GateRefused, GateRuleError, GateVerdict
from storage.names import AdapterRef, parse_ref, validate_name
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

    def visible_repo(namespace: str, name: str, who: Principal) -> None:
        if not who.can_see(namespace):
            raise ApiError(404, f"adapter {namespace}/{name} not found")
        try:
            validate_name(namespace, kind="namespace")
            validate_name(name, kind="adapter name")
        except InvalidName as exc:
            raise ApiError(400, str(exc), "name") from None

    def admin_only(who: Principal, what: str) -> None:
        if who.scope != "admin":
            raise ApiError(403, f"{what} needs an admin token (of the namespace, or the admin)")

    def actor(who: Principal) -> str:
        return "admin token" if who.namespace is None else f"{who.namespace} {who.scope} token"

    def verdict_body(v: GateVerdict) -> dict[str, Any]:
        return {"object": "gate.verdict", **v.as_dict()}

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

    @router.get("/idle", response_model=schemas.IdleAdapterList)
    def idle(
        days: float = Query(30, gt=0, le=3650, description="No traffic for this many days."),
        namespace: str | None = Query(None, max_length=64),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        """Ready versions that served nothing for ``days`` (nor were created within them)."""
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return {"object": "list", "days": days, "data": []}
            namespace = who.namespace
        found = usage.idle_versions(reg.catalog, days=days, namespace=namespace)
        data = [{"adapter": adapter_object(v),
                 "last_used_at": int(used.timestamp()) if used else None}
                for v, used in found]  # fmt: skip
        return {"object": "list", "days": days, "data": data}

    @router.get("/{namespace}/{name}/gates", response_model=schemas.Gates)
    def get_gates(namespace: str, name: str, who: Principal = Depends(principal)) -> dict:
        visible_repo(namespace, name, who)
        found = promotion.gates(reg.catalog, namespace=namespace, name=name)
        return {"object": "adapter.gates", "adapter": f"{namespace}/{name}", "gates": found}

    @router.put("/{namespace}/{name}/gates/{alias}", response_model=schemas.Gates)
    def put_gate(namespace: str, name: str, alias: str, body: schemas.GateBody,
                 who: Principal = Depends(principal)) -> dict:  # fmt: skip
        """Replace an alias's gate (an empty ``require`` clears it); admin scope."""
        visible_repo(namespace, name, who)
        admin_only(who, "setting a gate")
        try:
            promotion.set_gate(reg.catalog, namespace=namespace, name=name, alias=alias,
                               rules=body.require, actor=actor(who))  # fmt: skip
        except GateRuleError as exc:
            raise ApiError(422, str(exc), "require") from None
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None
        return get_gates(namespace, name, who)

    @router.delete("/{namespace}/{name}/gates/{alias}", response_model=schemas.Gates)
    def delete_gate(namespace: str, name: str, alias: str,
                    who: Principal = Depends(principal)) -> dict:  # fmt: skip
        visible_repo(namespace, name, who)
        admin_only(who, "clearing a gate")
        try:
            promotion.set_gate(reg.catalog, namespace=namespace, name=name, alias=alias,
                               rules=[], actor=actor(who))  # fmt: skip
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None
        return get_gates(namespace, name, who)

    @router.get("/{namespace}/{name}/events", response_model=schemas.CatalogEventList)
    def adapter_events(namespace: str, name: str, limit: int = Query(100, ge=1, le=1000),
                       who: Principal = Depends(principal)) -> dict:  # fmt: skip
        """Promotions (forced ones say so) and gate changes, newest first."""
        visible_repo(namespace, name, who)
        found = promotion.events(reg.catalog, namespace=namespace, name=name, limit=limit)
        return {"object": "list", "data": [catalog_event_object(e) for e in found]}

    @router.post("/{namespace}/{name}/aliases/{alias}/rollback", response_model=schemas.Adapter)
    def rollback(namespace: str, name: str, alias: str, body: schemas.RollbackBody,
                 who: Principal = Depends(principal)) -> dict:  # fmt: skip
        """Point ``alias`` back at the version it pointed at before its last move."""
        visible_repo(namespace, name, who)
        if body.force:
            admin_only(who, "passing a gate with force")
        try:
            v, _ = promotion.rollback(reg.catalog, namespace=namespace, name=name, alias=alias,
                                      force=body.force, actor=actor(who))  # fmt: skip
        except GateRefused as exc:
            raise ApiError(409, str(exc), "alias") from None
        except promotion.NothingToRollBack as exc:
            raise ApiError(409, str(exc), "alias") from None
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None
        return adapter_object(v)

    @router.get("/{namespace}/{ref}/gate", response_model=schemas.GateVerdict)
    def gate_check(namespace: str, ref: str, alias: str = Query(..., max_length=64),
                   who: Principal = Depends(principal)) -> dict:  # fmt: skip
        """What promoting this version to ``alias`` would meet at the gate now."""
        v = resolve_visible(namespace, ref, who)
        try:
            verdict = promotion.check(reg.catalog, ref=AdapterRef(v.namespace, v.name, v.version),
                                      alias=alias)  # fmt: skip
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None
        return verdict_body(verdict)

    @router.get("/{namespace}/{ref}/spectrum", response_model=schemas.Spectrum)
    def spectrum(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        """Per layer: the singular values of scaling·B·A and the ranks keeping 90 % / 99 %."""
        from orchestrator.spectra import version_spectrum

        v = resolve_visible(namespace, ref, who)
        return spectrum_object(v, version_spectrum(reg, v))

    @router.get("/{namespace}/{ref}", response_model=schemas.Adapter)
    def show_adapter(namespace: str, ref: str, who: Principal = Depends(principal)) -> dict:
        return adapter_object(resolve_visible(namespace, ref, who))

    @router.post("/{namespace}/{ref}/promote", response_model=schemas.Adapter)
    def promote(
        namespace: str, ref: str, body: schemas.PromoteBody, who: Principal = Depends(principal)
    ) -> dict[str, Any]:
        v = resolve_visible(namespace, ref, who)
        if body.force:
            admin_only(who, "passing a gate with force")
        try:
            return adapter_object(reg.promote(v.ref, body.alias, force=body.force,
                                              actor=actor(who)))  # fmt: skip
        except GateRefused as exc:  # the gate's numbers are the message
            raise ApiError(409, str(exc), "alias") from None
        except InvalidName as exc:
            raise ApiError(422, str(exc), "alias") from None

    @router.delete("/{namespace}/{ref}", response_model=schemas.Adapter)
    def delete_adapter(namespace: str, ref: str, force: bool = False,
                       who: Principal = Depends(principal)) -> dict:  # fmt: skip
        """Delete a version; 409 naming the aliases that point at it (``force``, an admin's:
        delete anyway, recorded as an event)."""
        v = resolve_visible(namespace, ref, who)
        if force:
            admin_only(who, "deleting a version an alias points at")
        return adapter_object(reg.delete(v.ref, force=force, actor=actor(who)))

    return router
