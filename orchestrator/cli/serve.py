"""``lorafleet serve``: the OpenAI-compatible serving app on Ray Serve."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from orchestrator.cli.common import console, err_console, user_errors
from workers.serving import DEFAULT_SLOTS


@user_errors
def serve(
    base: str = typer.Option(..., help="Registered base name, or a base model directory."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port."),
    replicas: int = typer.Option(1, min=1, help="Model server replicas (each holds the base)."),
    max_replicas: int | None = typer.Option(
        None, min=1, help="Autoscale between --replicas and this many replicas."
    ),
    slots: int = typer.Option(
        DEFAULT_SLOTS, min=1, help="Adapters in one batched forward pass, per replica."
    ),
    max_rank: int = typer.Option(64, min=1, help="Largest adapter rank the slots hold."),
    host_adapters: int = typer.Option(64, min=1, help="Adapters kept in host memory per replica."),
    merged: str | None = typer.Option(
        None, help="Serve only this adapter, merged into the base (no per-token LoRA cost)."
    ),
    alias_ttl: float = typer.Option(2.0, min=0, help="Seconds a resolved @alias is trusted."),
    cpus_per_replica: float = typer.Option(1.0, min=0, help="Ray CPUs per model replica."),
    max_batch_size: int = typer.Option(
        32, min=1, max=4096, help="Requests decoded together per replica (rows per step)."
    ),
    kv_cache_mb: float = typer.Option(
        512.0, min=1, help="KV-cache budget per replica (MiB); admission waits when it is full."
    ),
    max_queue: int = typer.Option(
        1024, min=1, help="Prompts waiting per replica; beyond it the API answers 429."
    ),
    max_queue_per_namespace: int = typer.Option(
        256, min=1, help="Prompts one namespace may have waiting; beyond, 429 for it alone."
    ),
    max_rows_per_namespace: int | None = typer.Option(
        None,
        min=1,
        help="Rows one namespace may decode at once (default: no cap; "
        "namespaces still share rows fairly).",
    ),
    slots_per_namespace: int | None = typer.Option(
        None, min=1, help="Adapter slots one namespace may pin at once (default: no cap)."
    ),
    kv_share_per_namespace: float | None = typer.Option(
        None, min=0.01, max=1.0, help="Share of the KV budget one namespace may hold."
    ),
    prefix_cache: bool = typer.Option(
        True, help="Keep prompt prefixes' KV per adapter version (inside --kv-cache-mb)."
    ),
    ingress: str = typer.Option(
        "auto",
        help="auto | direct (one replica answers HTTP itself) | combined (Serve's "
        "proxy, one replica) | separate (Serve's proxy, routing to model replicas).",
    ),
) -> None:
    """Serve the base and every adapter of it in the catalog (Ctrl-C stops)."""
    import ray

    from orchestrator.cli.common import upload_progress
    from orchestrator.uploads import local_base
    from storage.auth import admin_token_problem
    from storage.errors import InvalidName, NotFound
    from storage.registry import Registry
    from storage.settings import load_settings, settings_for_nodes
    from workers.errors import WorkerError
    from workers.serving.deployments import ServeOptions, start, stop

    settings = load_settings()
    token = settings.api_token.get_secret_value() if settings.api_token else None
    problem = admin_token_problem(token)
    if problem is not None:
        raise WorkerError(problem)
    registry = Registry.from_settings(settings)
    with upload_progress() as progress:
        stored = local_base(registry, base, progress=progress)
    base_name = stored.name if stored is not None else base
    try:
        registry.base(base_name)
    except (NotFound, InvalidName):
        raise WorkerError(f"--base {base!r} is neither a registered base nor a directory") from None
    if merged is not None:
        registry.resolve(merged)  # unknown reference: a clear error before Ray starts
    if ingress not in ("auto", "direct", "combined", "separate"):
        raise WorkerError(f"--ingress {ingress!r}: one of auto, direct, combined, separate")
    opts = ServeOptions(
        base_name=base_name, settings_json=settings_for_nodes(settings),
        slots=slots, max_rank=max_rank, host_adapters=host_adapters, replicas=replicas,
        max_replicas=max_replicas, alias_ttl_s=alias_ttl, merged=merged,
        num_cpus=cpus_per_replica, max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb,
        max_queue=max_queue, max_queue_per_namespace=max_queue_per_namespace,
        max_rows_per_namespace=max_rows_per_namespace, slots_per_namespace=slots_per_namespace,
        kv_share_per_namespace=kv_share_per_namespace, prefix_cache=prefix_cache,
        ingress=ingress,
    )  # fmt: skip
    if settings.api_token is None:
        err_console.print("warning: LORAFLEET_API_TOKEN is not set: only namespace tokens work")
    address = settings.ray_address or "local"
    stopping = threading.Event()
    with console.status(f"starting Ray ({address}) and {replicas} model replica(s)…"):
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)  # fmt: skip
        # From here on Ctrl-C / SIGTERM means "stop cleanly", even while replicas start.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        try:
            url = start(opts, host=host, port=port, quiet=True)
        except BaseException:
            ray.shutdown()
            raise
    what = f"{merged} merged into {base_name}" if merged else f"{base_name} + its adapters"
    if not stopping.is_set():
        console.print(f"serving {what} at [bold]{url}/v1[/] (OpenAI API); Ctrl-C stops")
    try:
        stopping.wait()
    finally:
        with console.status("stopping…"):
            stop()
            ray.shutdown()
        console.print("stopped")
