"""What a serving deployment is built from (its own module: the ingress and the model servers
both read it, and neither imports the other's module for it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.serving import DEFAULT_SLOTS


class ServeOptions(BaseModel):
    """Everything a deployment needs, serialisable so replicas can rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_name: str
    settings_json: str
    slots: int = Field(default=DEFAULT_SLOTS, ge=1, le=1024)
    max_rank: int = Field(default=64, ge=1, le=1024)
    host_adapters: int = Field(default=64, ge=1)
    replicas: int = Field(default=1, ge=1)
    max_replicas: int | None = Field(default=None, ge=1)  # set: autoscale replicas..max
    alias_ttl_s: float = Field(default=2.0, ge=0)
    merged: str | None = None
    max_batch_size: int = Field(default=32, ge=1, le=4096)  # rows decoded together
    kv_cache_mb: float = Field(default=512.0, gt=0)  # KV budget per replica
    prefill_chunk: int = Field(default=256, ge=1)  # prompt tokens prefilled per step
    max_queue: int = Field(default=1024, ge=1)  # waiting prompts per replica; then 429
    # per namespace (None: no cap below the replica's own); fairness holds whatever the caps
    max_queue_per_namespace: int | None = Field(default=256, ge=1)
    max_rows_per_namespace: int | None = Field(default=None, ge=1)
    slots_per_namespace: int | None = Field(default=None, ge=1)
    kv_share_per_namespace: float | None = Field(default=None, gt=0, le=1)
    prefix_cache: bool = True  # keep prompt prefixes' KV (inside kv_cache_mb)
    # how the app takes HTTP (deployments.ingress_mode): "direct" (one replica answers HTTP
    # itself), "combined" (Serve's proxy, one replica that is the ingress), "separate" (Serve's
    # proxy, an ingress routing to model replicas); "auto" picks by the replica count
    ingress: Literal["auto", "direct", "combined", "separate"] = "auto"
    num_cpus: float = Field(default=1.0, ge=0)
    usage_flush_s: float = Field(default=5.0, gt=0)  # metering and replica snapshots
