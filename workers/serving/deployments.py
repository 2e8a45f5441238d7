"""The Ray Serve app: an OpenAI-compatible ingress, alone or in front of model replicas.

A thin shell around ``ServingEngine`` (held by ``host.EngineHost``). With one replica (the
default), the ingress holds the engine itself. With several:

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
from typing import Any, Literal

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


def _server_class(opts: ServeOptions) -> Any:
    """The model server deployment (its multiplexing LRU size is a decoration-time setting)."""
    from ray import serve

    from workers.serving.engine import error_kind
    from workers.serving.host import EngineHost

    @serve.deployment(max_ongoing_requests=512, health_check_period_s=2)
    class LoraModelServer:
        """One replica behind the ingress: the base once, adapter slots, batched decoding."""

        def __init__(self, options_json: str) -> None:
            self.opts = ServeOptions.model_validate_json(options_json)
            self.host = EngineHost(self.opts, host_adapters=None)  # Serve's LRU decides
            self.engine = self.host.engine
            self._versions: dict[str, Any] = {}  # exact ref -> the version the ingress sent

        def __del__(self) -> None:
            host = getattr(self, "host", None)
            if host is not None:
                host.close()

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
            version, adapter = payload.get("version"), payload.get("adapter")
            if version is not None:
                self._versions[version.ref] = version
            if adapter is not None and self.engine.merged is None:
                try:
                    await self._ensure_staged(adapter)
                except Exception as exc:  # reported to this request only
                    yield {"error": str(exc), "kind": error_kind(exc)}
                    return
            async for item in self.host.stream(payload):
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


IngressMode = Literal["direct", "combined", "separate"]


def ingress_mode(opts: ServeOptions, *, direct_ok: bool) -> IngressMode:
    """How the app takes HTTP (``ServeOptions.ingress``; "auto" picks):

    - "separate": Ray Serve's proxy, an ingress that routes each request to the model replica
      holding its adapter (Serve's multiplexing), ``LoraModelServer`` replicas — for several
      replicas or autoscaling;
    - "combined": Ray Serve's proxy and one replica that is the ingress and holds the engine —
      one replica behind Serve's proxy (a RayService);
    - "direct": one replica that holds the engine and answers HTTP itself — ``lorafleet
      serve``'s default (``direct_ok``: the caller starts Serve without a proxy).
    """
    single = opts.replicas == 1 and (opts.max_replicas is None or opts.max_replicas <= 1)
    if opts.ingress != "auto":
        if opts.ingress == "direct" and not (direct_ok and single):
            raise ValueError("ingress 'direct' needs one replica started by lorafleet serve")
        return opts.ingress
    if not single:
        return "separate"
    return "direct" if direct_ok else "combined"


def build_app(opts: ServeOptions, *, host: str | None = None, port: int | None = None) -> Any:
    """The bound Ray Serve application (``ingress_mode`` says which shape; ``host`` and
    ``port`` for a direct one).

    With one replica the engine sits in the process that parses HTTP: no second process, and
    no remote call per request or streamed chunk.
    """
    from workers.serving.ingress import DirectServer, OpenAIIngress

    mode = ingress_mode(opts, direct_ok=host is not None and port is not None)
    quiet = {"enable_access_log": False}  # a log line per request costs the hot path
    cpus = {"num_cpus": opts.num_cpus}
    if mode == "direct":
        direct: Any = DirectServer
        return direct.options(ray_actor_options=cpus, logging_config=quiet).bind(
            opts.model_dump_json(), host, port
        )
    deployment: Any = OpenAIIngress  # a Serve deployment (the decorator made it one)
    if mode == "combined":
        alone = deployment.options(ray_actor_options=cpus, logging_config=quiet)
        return alone.bind(None, opts.model_dump_json())
    server = _server_class(opts)
    scaling: dict[str, Any]
    if opts.max_replicas is not None and opts.max_replicas > opts.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": opts.replicas, "max_replicas": opts.max_replicas,
            "target_ongoing_requests": max(4, opts.max_batch_size // 2)}}  # fmt: skip
    else:
        scaling = {"num_replicas": opts.replicas}
    bound = server.options(ray_actor_options=cpus, logging_config=quiet,
                           **scaling).bind(opts.model_dump_json())  # fmt: skip
    ingress = deployment.options(ray_actor_options={"num_cpus": 0},  # I/O only
                                 logging_config=quiet)  # fmt: skip
    return ingress.bind(bound, opts.model_dump_json())


def start(
    opts: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
    timeout_s: float = 300.0,
) -> str:  # fmt: skip
    """Deploy the app on the connected Ray cluster (``ray.init`` first); returns its URL.

    Returns once it answers ``GET /health``. ``quiet`` keeps Serve's own INFO lines off the
    console (a CLI that reports progress itself).
    """
    from ray import serve

    direct = ingress_mode(opts, direct_ok=True) == "direct"
    if direct:  # the replica binds the address itself: no Serve proxy
        serve.start(http_options={"location": "NoServer"})
    else:
        serve.start(http_options={"host": host, "port": port})
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app = build_app(opts, host=host, port=port) if direct else build_app(opts)
    serve.run(app, name=APP_NAME, route_prefix=None if direct else "/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    _wait_healthy(url, timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the serving app at {url} did not answer in {timeout_s:.0f} s")
        time.sleep(0.2)


def stop() -> None:
    """Delete the app and stop Serve on the connected cluster."""
    from ray import serve

    serve.shutdown()
