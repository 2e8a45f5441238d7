"""``/v1/usage`` and ``/v1/serving``: what was served, by whom, and what the replicas hold.

Both read the catalog only: serving replicas write their usage buckets and snapshots there, so
this API needs no network path to them. A namespace token sees its own namespace's usage and
only its own adapters in a replica's tiers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.durations import parse_duration
from orchestrator.http_errors import ApiError
from orchestrator.objects import replica_object, usage_object
from storage.auth import Principal
from storage.catalog import usage
from storage.catalog.db import Catalog
from storage.catalog.models import utcnow

REPLICA_MAX_AGE_S = 60.0  # a replica silent this long is gone (it writes every few seconds)


def usage_router(db: Catalog, principal: PrincipalDep) -> APIRouter:
    """The metering and serving routes over ``db``; ``principal`` is the auth dependency."""
    router = APIRouter(tags=["usage"], responses=schemas.ERRORS)

    @router.get("/v1/usage", response_model=schemas.UsageList)
    def get_usage(
        namespace: str | None = Query(None, max_length=64),
        adapter: str | None = Query(None, max_length=200,
                                    description="ns/name (every version), ns/name:3, or the base"),
        since: str = Query("30d", max_length=16, description="How far back: 15m, 12h, 30d."),
        group: Literal["model", "minute"] = "model",
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:  # fmt: skip
        """Requests and tokens served, summed per model, or per model and minute."""
        if who.namespace is not None:
            if namespace not in (None, who.namespace):
                return {"object": "list", "group": group, "data": []}
            namespace = who.namespace
        try:
            start = utcnow() - timedelta(seconds=parse_duration(since, "since"))
        except ValueError as exc:
            raise ApiError(422, str(exc), "since") from None
        found = usage.query_usage(db, namespace=namespace, adapter=adapter, since=start,
                                  group=group)  # fmt: skip
        data = [usage_object(u, per_minute=group == "minute") for u in found]
        return {"object": "list", "group": group, "data": data}

    @router.get("/v1/serving", response_model=schemas.Serving)
    def serving(who: Principal = Depends(principal)) -> dict[str, Any]:
        """Serving replicas seen in the last minute: tiers, load latencies, queue."""
        found = usage.live_replicas(db, max_age_s=REPLICA_MAX_AGE_S)
        return {"object": "serving",
                "replicas": [replica_object(r, who.namespace) for r in found]}  # fmt: skip

    return router
