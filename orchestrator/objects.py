"""The JSON shape of every object the API returns, and ``lorafleet … -o json`` prints.

One owner for these shapes: the REST API and the CLI call the same functions, so a script
that reads one reads the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the CLI imports this module without the ORM
    from storage.catalog import jobs, packs, promotion, usage
    from storage.catalog.domain import AdapterVersion, ApiToken, DataFile


def job_object(
    job: jobs.Job, adapter: str | None = None, last_metrics: jobs.JobEvent | None = None
) -> dict[str, Any]:
    """A job as the API shows it (OpenAI's field names where they fit); ``progress`` from its
    newest metrics event when the caller read it."""
    spec = job.spec
    max_steps = (spec.get("training") or {}).get("max_steps")
    progress = None
    if last_metrics is not None:
        progress = {"step": last_metrics.data.get("step"), "max_steps": max_steps,
                    "loss": last_metrics.data.get("loss")}  # fmt: skip
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "namespace": job.namespace,
        "name": job.name,
        "status": job.state,
        "status_reason": job.status_reason,
        "model": spec.get("base_model"),
        "training_file": spec.get("training_data"),
        "validation_file": spec.get("validation_data"),
        "hyperparameters": {"lora": spec.get("lora"), "training": spec.get("training")},
        "resources": spec.get("resources"),
        "priority": job.priority,
        "attempts": job.attempts,
        "error": job.error,
        "fine_tuned_model": adapter,
        "pack_id": job.pack_id,
        "progress": progress,
        "created_at": int(job.created_at.timestamp()),
        "started_at": int(job.started_at.timestamp()) if job.started_at else None,
        "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None,
    }


def pack_object(p: packs.Pack) -> dict[str, Any]:
    """A pack: jobs on one base training in one worker group, and its slots."""
    return {
        "id": p.id, "object": "pack", "state": p.state, "jobs": list(p.jobs),
        "slots": {"used": len(p.jobs), "max": p.max_slots, "free": p.free_slots},
        "base_fingerprint": p.pack_key.split("|", 1)[0],
        "created_at": int(p.created_at.timestamp()),
        "closed_at": int(p.closed_at.timestamp()) if p.closed_at else None,
    }  # fmt: skip


def adapter_object(v: AdapterVersion) -> dict[str, Any]:
    return {
        "id": v.ref,
        "object": "adapter",
        "namespace": v.namespace,
        "name": v.name,
        "version": v.version,
        "state": v.state,
        "aliases": list(v.aliases),
        "tags": list(v.tags),
        "base_model": {"name": v.base_model.name, "fingerprint": v.base_model.fingerprint},
        "lora": {"r": v.r, "alpha": v.alpha, "target_modules": v.target_modules,
                 "use_rslora": v.use_rslora, "method": v.method},
        "lineage": {"job_id": v.job_id, "dataset_sha256": v.dataset_sha256,
                    "hyperparameters": v.hyperparameters, "created_by": v.created_by},
        "metrics": v.metrics,
        "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in v.files],
        "created_at": int(v.created_at.timestamp()) if v.created_at else None,
    }  # fmt: skip


def file_object(f: DataFile) -> dict[str, Any]:
    """A file as the API shows it (OpenAI's fields, plus namespace, rows and digest)."""
    return {
        "id": f.id, "object": "file", "bytes": f.bytes, "filename": f.filename,
        "purpose": f.purpose, "status": "processed", "namespace": f.namespace, "rows": f.rows,
        "sha256": f.sha256,
        "created_at": int(f.created_at.timestamp()) if f.created_at else None,
    }  # fmt: skip


def event_object(e: jobs.JobEvent) -> dict[str, Any]:
    return {"id": e.id, "object": "fine_tuning.job.event", "created_at": e.ts.timestamp(),
            "type": e.kind, "data": e.data}  # fmt: skip


def token_object(t: ApiToken, secret: str | None = None) -> dict[str, Any]:
    def ts(d: Any) -> float | None:
        return d.timestamp() if d is not None else None

    body = {"id": t.id, "object": "token", "namespace": t.namespace, "name": t.name,
            "scope": t.scope, "created_at": ts(t.created_at),
            "expires_at": ts(t.expires_at), "revoked_at": ts(t.revoked_at)}  # fmt: skip
    if secret is not None:
        body["token"] = secret  # shown once, never stored
    return body


def usage_object(u: usage.UsageCount, *, per_minute: bool = False) -> dict[str, Any]:
    """Served requests and tokens of one model in one namespace (in one minute, or summed)."""
    body: dict[str, Any] = {
        "object": "usage", "namespace": u.namespace, "model": u.model, "requests": u.requests,
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }  # fmt: skip
    body["minute" if per_minute else "first_minute"] = int(u.minute.timestamp())
    return body


def replica_object(r: usage.ReplicaSnapshot, namespace: str | None = None) -> dict[str, Any]:
    """A serving replica's last snapshot; a namespace token sees only its own adapters in it."""

    def mine(refs: list[str]) -> list[str]:
        return [x for x in refs if namespace is None or x.startswith(f"{namespace}/")]

    s = r.stats
    slots, host = s.get("slots", {}), s.get("host", {})
    return {
        "object": "serving.replica", "id": r.replica_id, "base": r.base, "node": r.node,
        "updated_at": r.updated_at.timestamp(),
        "tiers": {"device": mine(list(slots.get("resident", []))),
                  "host": mine(list(host.get("resident", []))),
                  "device_slots": slots.get("n"), "host_capacity": host.get("capacity")},
        "load_ms": s.get("load_ms", {}),
        "counters": {"slot_hits": slots.get("hits"), "slot_loads": slots.get("loads"),
                     "host_hits": host.get("hits"), "host_misses": host.get("misses"),
                     "disk_downloads": s.get("disk", {}).get("downloads")},
        "queue": s.get("queue", {}),
        "prefix_cache": {k: v for k, v in s.get("prefix_cache", {}).items()
                         if k in ("enabled", "tokens", "hits", "misses", "hit_tokens",
                                  "miss_tokens", "evicted_blocks")},
    }  # fmt: skip


def catalog_event_object(e: promotion.CatalogEvent) -> dict[str, Any]:
    """A promotion or gate change of an adapter (forced promotions say so in ``type``)."""
    return {"id": e.id, "object": "adapter.event", "adapter": f"{e.namespace}/{e.name}",
            "created_at": e.ts.timestamp(), "type": e.kind, "alias": e.alias,
            "version": e.version, "actor": e.actor, "data": e.data}  # fmt: skip
