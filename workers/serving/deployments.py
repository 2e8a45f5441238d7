"""The Ray Serve app: an OpenAI-compatible ingress in front of ``LoraModelServer`` replicas.

A thin shell around ``ServingEngine``:

- the ingress (FastAPI) authenticates, resolves ``model`` to an exact adapter version (TTL
  cache, so an alias promotion moves traffic without a redeploy) and calls a replica with
  ``multiplexed_model_id`` = that version and the version record itself (one resolution per
  request), so Ray Serve routes the request to a replica that already holds the adapter;
- a replica stages the adapter through ``@serve.multiplexed``, whose LRU is the one that
  decides which adapters stay in host memory (it also reports residency to the router), and
  submits the request to the engine's decode loop, where it joins the running batch — any mix
  of adapters and the bare base — at the next step. Text streams back step by step.
  (``@serve.batch`` is not used: it batches whole calls, and Ray Serve splits its batches by
  multiplexed model id.)

Nothing here is numerics; everything it calls is plain Python tested without Ray.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from workers.serving.options import ServeOptions

log = logging.getLogger(__name__)

APP_NAME = "lorafleet"
__all__ = ["APP_NAME", "ServeOptions", "build_app", "start", "stop"]


class _Staged:
    """What ``@serve.multiplexed`` caches per adapter: the (possibly running) host load.

    Serve calls ``__del__`` when its LRU evicts the adapter: the engine then drops it from
    host memory too, so Serve's LRU is the only one deciding what stays there.
    """

    def __init__(self, future: asyncio.Future[Any], drop: Any) -> None:
        self.future = future
        self._drop = drop

    def __del__(self) -> None:
        drop, self._drop = self._drop, None
        if drop is not None:
            drop()


class _ReplicaMetrics:
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


def _replica_id() -> str:
    from ray import serve

    rid = serve.get_replica_context().replica_id
    return str(getattr(rid, "unique_id", rid))


def ray_node_id() -> str | None:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray: no node to name
        return None


def _server_class(opts: ServeOptions) -> Any:
    from ray import serve

    from storage.catalog import usage as usage_store
    from storage.registry import Registry
    from storage.settings import settings_on_node
    from workers.serving.decode_loop import TenantLimits
    from workers.serving.engine import GenRequest, ServingEngine, error_kind
    from workers.serving.metering import Periodic
    from workers.serving.streams import stream

    @serve.deployment(max_ongoing_requests=512, health_check_period_s=2)
    class LoraModelServer:
        """One replica: the base once, adapter slots, batched decoding."""

        def __init__(self, options_json: str) -> None:
            self.opts = ServeOptions.model_validate_json(options_json)
            settings = settings_on_node(self.opts.settings_json)
            registry = Registry.from_settings(settings)
            base_dir = registry.base_dir(self.opts.base_name)  # this node's verified copy
            o = self.opts
            self.engine = ServingEngine(
                base_dir, registry, slots=o.slots, max_rank=o.max_rank,
                alias_ttl_s=o.alias_ttl_s, host_adapters=None,  # Serve's LRU decides
                merged=o.merged, max_rows=o.max_batch_size, kv_cache_mb=o.kv_cache_mb,
                prefill_chunk=o.prefill_chunk, max_queue=o.max_queue,
                prefix_cache=o.prefix_cache, kv_share_per_namespace=o.kv_share_per_namespace,
                tenants=TenantLimits(max_queue=o.max_queue_per_namespace,
                                     max_rows=o.max_rows_per_namespace,
                                     max_slots=o.slots_per_namespace),
            )  # fmt: skip
            self.metrics = _ReplicaMetrics()
            self._versions: dict[str, Any] = {}  # exact ref -> the version the ingress sent
            # the replica tells the catalog what it holds, so the API and the console see
            # serving without a network path to the replicas
            self.catalog = registry.catalog
            self.replica_id = _replica_id()
            self.node = ray_node_id()
            self.snapshots = Periodic(self._snapshot, self.opts.usage_flush_s,
                                      "lorafleet-replica-snapshot").start()  # fmt: skip

        def __del__(self) -> None:
            snapshots = getattr(self, "snapshots", None)
            if snapshots is not None:
                snapshots.stop(final=False)
                try:
                    usage_store.forget_replica(self.catalog, replica_id=self.replica_id)
                except Exception as exc:  # the snapshot ages out of the console instead
                    log.warning("could not remove replica %s from the catalog: %s",
                                self.replica_id, exc)  # fmt: skip

        def _snapshot(self) -> None:
            usage_store.record_replica(self.catalog, replica_id=self.replica_id,
                                       base=self.opts.base_name, node=self.node,
                                       stats=replica_snapshot(self.engine))  # fmt: skip

        @serve.multiplexed(max_num_models_per_replica=opts.host_adapters)
        async def _adapter(self, ref: str) -> _Staged:
            # Return at once with the load running in a thread: Ray's multiplexer loads under
            # one lock, and loads of different adapters should overlap.
            loop = asyncio.get_running_loop()
            drop = functools.partial(self._evicted, ref)
            return _Staged(loop.run_in_executor(None, self._stage_sync, ref), drop)

        def _evicted(self, ref: str) -> None:
            self._versions.pop(ref, None)
            self.engine.drop_host(ref)

        def _stage_sync(self, ref: str) -> None:
            version = self._versions.get(ref) or self.engine.resolve(ref)
            self.engine.stage(version)

        async def _ensure_staged(self, ref: str) -> None:
            staged = await self._adapter(ref)
            if staged.future.done() and staged.future.exception() is not None:
                loop = asyncio.get_running_loop()  # a failed load is retried, never cached
                staged.future = loop.run_in_executor(None, self._stage_sync, ref)
            await asyncio.shield(staged.future)

        async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            """Stream ``{"ready"}``, then ``{"deltas"}`` (streamed requests), then
            ``{"results"}`` (or one ``{"error"}``): see ``streams.py``."""
            payload = dict(payload)
            version = payload.pop("version", None)
            prompts = payload.pop("prompts")
            deltas = bool(payload.pop("stream", False))
            payload["stop"] = tuple(payload.get("stop") or ())
            reqs = [GenRequest(prompt=ids, prompt_index=i, **payload)
                    for i, ids in enumerate(prompts)]  # fmt: skip
            adapter = payload.get("adapter")
            if version is not None:
                self._versions[version.ref] = version
            if adapter is not None and self.engine.merged is None:
                try:
                    await self._ensure_staged(adapter)
                except Exception as exc:  # reported to this request only
                    yield {"error": str(exc), "kind": error_kind(exc)}
                    return
            async for item in stream(self.engine, reqs, version, deltas=deltas):
                if "results" in item:
                    self.metrics.update(self.engine)
                yield item

        async def load(self) -> dict[str, Any]:
            """Pre-warm the adapter named by the request's multiplexed model id."""
            ref = serve.get_multiplexed_model_id()
            await self._ensure_staged(ref)
            slot = await asyncio.to_thread(self.engine.warm, ref)
            stats = self.engine.stats()
            return {"adapter": ref, "slot": slot, "host": stats["host"]["resident"]}

        async def unload(self, disk: bool = True) -> bool:
            ref = serve.get_multiplexed_model_id()
            return await asyncio.to_thread(self.engine.unload, ref, disk=disk)

        async def stats(self) -> dict[str, Any]:
            return self.engine.stats()

    return LoraModelServer


def build_app(opts: ServeOptions) -> Any:
    """The bound Ray Serve application (ingress + model servers)."""
    from workers.serving.ingress import OpenAIIngress

    server = _server_class(opts)
    scaling: dict[str, Any]
    if opts.max_replicas is not None and opts.max_replicas > opts.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": opts.replicas, "max_replicas": opts.max_replicas,
            "target_ongoing_requests": max(4, opts.max_batch_size // 2)}}  # fmt: skip
    else:
        scaling = {"num_replicas": opts.replicas}
    bound = server.options(ray_actor_options={"num_cpus": opts.num_cpus}, **scaling).bind(
        opts.model_dump_json()
    )
    deployment: Any = OpenAIIngress  # a Serve deployment (the decorator made it one)
    ingress = deployment.options(ray_actor_options={"num_cpus": 0})  # I/O only
    return ingress.bind(bound, opts.model_dump_json())


def start(
    opts: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> str:
    """Deploy the app on the connected Ray cluster (``ray.init`` first); returns its URL.

    Returns once every replica is up (``GET /health`` answers). ``quiet`` keeps Serve's own
    INFO lines off the console (a CLI that reports progress itself).
    """
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.run(build_app(opts), name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def stop() -> None:
    """Delete the app and stop Serve on the connected cluster."""
    from ray import serve

    serve.shutdown()
