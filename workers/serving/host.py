"""One replica's engine and what keeps it visible: metrics, and snapshots in the catalog.

``EngineHost`` is what a Ray Serve replica that decodes holds — the ``LoraModelServer`` of the
two-tier app, or the ingress itself when the app is one replica (``deployments.build_app``):
the ``ServingEngine`` built from ``ServeOptions`` on this node's verified copy of the base,
the replica's Prometheus counters, and a thread that writes the engine's stats to the catalog
(so the API and the console see serving without a network path to the replicas).
``requests_of`` turns the ingress's payload into the engine's requests (one owner for both).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from workers.serving.options import ServeOptions

log = logging.getLogger(__name__)


class ReplicaMetrics:
    """Prometheus metrics of one replica (Ray's metrics agent exports them), from engine stats."""

    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {  # metric -> path in engine.stats()
        "lorafleet_slot_hits": ("slots", "hits"),
        "lorafleet_slot_loads": ("slots", "loads"),
        "lorafleet_slot_evictions": ("slots", "evictions"),
        "lorafleet_host_hits": ("host", "hits"),
        "lorafleet_host_misses": ("host", "misses"),
        "lorafleet_disk_downloads": ("disk", "downloads"),
        "lorafleet_batched_rows": ("batches", "rows"),
        "lorafleet_forward_passes": ("batches", "count"),
        "lorafleet_decode_steps": ("batches", "steps"),
        "lorafleet_requests_rejected": ("queue", "rejected"),
        "lorafleet_requests_preempted": ("queue", "preempted"),
        "lorafleet_prefix_cache_hits": ("prefix_cache", "hits"),
        "lorafleet_prefix_cache_misses": ("prefix_cache", "misses"),
        "lorafleet_prefix_cache_hit_tokens": ("prefix_cache", "hit_tokens"),
        "lorafleet_prefix_cache_miss_tokens": ("prefix_cache", "miss_tokens"),
    }

    def __init__(self) -> None:
        from ray.serve import metrics

        self._counters = {n: metrics.Counter(n, description=f"{a}.{b} of the serving engine")
                          for n, (a, b) in self.COUNTERS.items()}  # fmt: skip
        self._load_ms = metrics.Histogram(
            "lorafleet_adapter_load_ms", description="adapter load into host memory (ms)",
            boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000],
        )  # fmt: skip
        self._last: dict[str, int] = dict.fromkeys(self.COUNTERS, 0)
        self._loads_seen = 0

    def update(self, engine: Any) -> None:
        stats = engine.stats()
        for name, (a, b) in self.COUNTERS.items():
            value = int(stats[a][b])
            if value > self._last[name]:
                self._counters[name].inc(value - self._last[name])
                self._last[name] = value
        loads = engine.tier_stats.load_ms
        for ms in loads[self._loads_seen :]:
            self._load_ms.observe(ms)
        self._loads_seen = len(loads)


def replica_snapshot(engine: Any) -> dict[str, Any]:
    """What a replica writes to the catalog: the engine's stats and its load latencies."""
    stats = dict(engine.stats())
    loads = sorted(engine.tier_stats.load_ms)

    def quantile(q: float) -> float | None:  # nearest rank
        return loads[min(len(loads) - 1, int(q * len(loads)))] if loads else None

    stats["load_ms"] = {"count": len(loads), "p50": quantile(0.5), "p95": quantile(0.95),
                        "max": quantile(1.0)}  # fmt: skip
    return stats


def replica_id() -> str:
    """This Serve replica's id; outside Serve (the app served in-process by uvicorn, as tests
    and benchmarks do) a unique name of this process."""
    import os
    import uuid

    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        rid = serve.get_replica_context().replica_id
    except RayServeException:
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return str(getattr(rid, "unique_id", rid))


def _in_ray() -> bool:
    import ray

    return bool(ray.is_initialized())


def ray_node_id() -> str | None:
    import ray

    if not ray.is_initialized():  # outside Ray: no node to name (and none to start)
        return None
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray: no node to name
        return None


def _normal_priority() -> None:
    """Undo Ray's niceness (it starts workers at 15 so that its own daemons stay responsive):
    a serving replica is the latency-critical work of its node, and at 15 any other process
    on the node — a client, an exporter — takes its CPU first. Best effort: without the right
    to raise priority (an unprivileged container), the replica keeps Ray's."""
    import os

    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as exc:
        log.info("serving at Ray's worker priority (%s)", exc)


def requests_of(payload: dict[str, Any]) -> tuple[list[Any], Any, bool]:
    """The engine's requests for an ingress payload (``Frontend.prepare``'s), the exact
    version the ingress resolved, and whether text is streamed."""
    from workers.serving.engine import GenRequest

    payload = dict(payload)
    version = payload.pop("version", None)
    prompts = payload.pop("prompts")
    deltas = bool(payload.pop("stream", False))
    payload["stop"] = tuple(payload.get("stop") or ())
    reqs = [GenRequest(prompt=ids, prompt_index=i, **payload) for i, ids in enumerate(prompts)]
    return reqs, version, deltas


class EngineHost:
    """The engine of one replica, its metrics and its catalog snapshots.

    Args:
        opts: the deployment's options.
        host_adapters: adapters kept parsed in host memory (None: the caller evicts, as the
            two-tier app's model servers let Serve's multiplexing LRU decide).
    """

    def __init__(self, opts: ServeOptions, *, host_adapters: int | None) -> None:
        from storage.registry import Registry
        from storage.settings import settings_on_node
        from workers.serving.decode_loop import TenantLimits
        from workers.serving.engine import ServingEngine
        from workers.serving.metering import Periodic

        self.opts = o = opts
        _normal_priority()
        registry = Registry.from_settings(settings_on_node(opts.settings_json))
        base_dir = registry.base_dir(opts.base_name)  # this node's verified copy
        self.engine = ServingEngine(
            base_dir, registry, slots=o.slots, max_rank=o.max_rank, alias_ttl_s=o.alias_ttl_s,
            host_adapters=host_adapters, merged=o.merged, max_rows=o.max_batch_size,
            kv_cache_mb=o.kv_cache_mb, prefill_chunk=o.prefill_chunk, max_queue=o.max_queue,
            prefix_cache=o.prefix_cache, kv_share_per_namespace=o.kv_share_per_namespace,
            tenants=TenantLimits(max_queue=o.max_queue_per_namespace,
                                 max_rows=o.max_rows_per_namespace,
                                 max_slots=o.slots_per_namespace),
        )  # fmt: skip
        # Ray's metrics exist inside a Ray process only (an in-process app starts no Ray)
        self.metrics = ReplicaMetrics() if _in_ray() else None
        self.catalog = registry.catalog
        self.replica_id = replica_id()
        self.node = ray_node_id()
        self.snapshots = Periodic(self._snapshot, opts.usage_flush_s,
                                  "lorafleet-replica-snapshot").start()  # fmt: skip

    def _snapshot(self) -> None:
        from storage.catalog import usage as usage_store

        if self.metrics is not None:  # counters move with the snapshots, not per request
            self.metrics.update(self.engine)
        usage_store.record_replica(self.catalog, replica_id=self.replica_id,
                                   base=self.opts.base_name, node=self.node,
                                   stats=replica_snapshot(self.engine))  # fmt: skip

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The items of one request (``streams.py``): ready or an error, deltas, results."""
        from workers.serving.streams import stream

        reqs, version, deltas = requests_of(payload)
        async for item in stream(self.engine, reqs, version, deltas=deltas):
            yield item

    def close(self) -> None:
        """Stop the snapshots (the replica leaves the catalog's list) and the engine."""
        from storage.catalog import usage as usage_store

        self.snapshots.stop(final=False)
        try:
            usage_store.forget_replica(self.catalog, replica_id=self.replica_id)
        except Exception as exc:  # the snapshot ages out of the console instead
            log.warning("could not remove replica %s from the catalog: %s", self.replica_id, exc)
        self.engine.close()
