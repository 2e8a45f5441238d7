"""Ray Serve application builders for a config file or a KubeRay ``RayService``.

``serveConfigV2`` names ``workers.serving.app:build`` as the import path and passes ``args``;
configuration (catalog, object store, tokens) comes from the ``LORAFLEET_*`` environment of
the cluster's pods, exactly as for ``lorafleet serve``.

    applications:
      - name: lorafleet
        import_path: workers.serving.app:build
        args: {base: llama-3-8b, slots: 16, replicas: 2}

The base is a registered name (``lorafleet base register``): every replica downloads it from
the object store into its node's verified cache.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.names import NAME_RE
from workers.serving.options import DEFAULT_SLOTS


class AppArgs(BaseModel):
    """The ``args`` of the serving application (the same knobs as ``lorafleet serve``)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="A registered base name.")

    @field_validator("base")
    @classmethod
    def _registered_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "must be a registered base's name (lorafleet base register NAME DIR); replicas "
                "fetch it from the object store, a path means nothing on their nodes"
            )
        return v

    slots: int = Field(default=DEFAULT_SLOTS, ge=1)
    max_rank: int = Field(default=64, ge=1)
    host_adapters: int = Field(default=64, ge=1)
    replicas: int = Field(default=1, ge=1)
    max_replicas: int | None = Field(default=None, ge=1)
    merged: str | None = None
    alias_ttl_s: float = Field(default=2.0, ge=0)
    cpus_per_replica: float = Field(default=1.0, ge=0)
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    kv_cache_mb: float = Field(default=512.0, gt=0)
    max_queue: int = Field(default=1024, ge=1)
    max_queue_per_namespace: int | None = Field(default=256, ge=1)
    max_rows_per_namespace: int | None = Field(default=None, ge=1)
    slots_per_namespace: int | None = Field(default=None, ge=1)
    kv_share_per_namespace: float | None = Field(default=None, gt=0, le=1)
    prefix_cache: bool = True
    ingress: Literal["auto", "combined", "separate"] = "auto"  # behind Serve's proxy here


def options_from(args: AppArgs) -> Any:
    """``ServeOptions`` for ``args`` under the environment's settings."""
    from storage.auth import admin_token_problem
    from storage.registry import Registry
    from storage.settings import load_settings, settings_for_nodes
    from workers.serving.deployments import ServeOptions

    settings = load_settings()
    token = settings.api_token.get_secret_value() if settings.api_token else None
    problem = admin_token_problem(token)
    if problem is not None:
        raise ValueError(problem)
    base_name = Registry.from_settings(settings).base(args.base).name  # registered, or an error
    return ServeOptions(
        base_name=base_name, settings_json=settings_for_nodes(settings),
        slots=args.slots, max_rank=args.max_rank, host_adapters=args.host_adapters,
        replicas=args.replicas, max_replicas=args.max_replicas, merged=args.merged,
        alias_ttl_s=args.alias_ttl_s, num_cpus=args.cpus_per_replica,
        max_batch_size=args.max_batch_size, kv_cache_mb=args.kv_cache_mb,
        max_queue=args.max_queue, max_queue_per_namespace=args.max_queue_per_namespace,
        max_rows_per_namespace=args.max_rows_per_namespace,
        slots_per_namespace=args.slots_per_namespace,
        kv_share_per_namespace=args.kv_share_per_namespace, prefix_cache=args.prefix_cache,
        ingress=args.ingress,
    )  # fmt: skip


def build(args: dict[str, Any]) -> Any:
    """The serving application for ``serve run`` / ``serveConfigV2``."""
    from workers.serving.deployments import build_app

    return build_app(options_from(AppArgs.model_validate(args)))
