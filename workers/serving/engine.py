"""The serving engine of one replica: base once, adapters in slots, mixed batches.

Plain Python (the Ray Serve deployment will be a thin shell around it). A request names an
adapter reference (``ns/name``, ``ns/name:3``, ``ns/name@alias``) or the base. References
resolve through the catalog with a short TTL, so promoting an alias moves traffic without a
redeploy; the bytes come through the node cache (SHA-256 verified) and are checked against
the served base (fingerprint and shapes) before they enter a slot. A request whose adapter
cannot be served fails alone; the rest of the batch is served.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from storage.catalog.domain import AdapterVersion
from storage.errors import StorageError
from storage.fingerprint import fingerprint_model_dir
from storage.registry import Registry
from workers.base_model import load_base
from workers.lora import match_target_modules
from workers.serving.generate import generate_mixed
from workers.serving.multi_lora import BASE_SLOT, to_multi_lora
from workers.serving.slots import AdapterSlots

log = logging.getLogger(__name__)


class AdapterMismatch(ValueError):
    """The adapter was trained on another base (fingerprint) or does not fit its shapes."""


@dataclass
class Completion:
    """One request's answer, or its error (the batch goes on without it)."""

    text: str | None
    adapter: str | None  # the exact version used, e.g. "team/x:3"
    error: str | None = None


class ServingEngine:
    """Base model + adapter slots + registry for one replica."""

    def __init__(
        self,
        base_dir: str | Path,
        registry: Registry,
        *,
        slots: int = 4,
        max_rank: int = 64,
        targets: tuple[str, ...] | str = "all-linear",
        alias_ttl_s: float = 2.0,
    ) -> None:
        self.registry = registry
        self.model, self.tokenizer = load_base(base_dir)
        self.fingerprint = fingerprint_model_dir(base_dir).sha256
        paths = match_target_modules(self.model, targets)
        self.layers = to_multi_lora(self.model, paths, n_slots=slots, max_rank=max_rank)
        self.slots = AdapterSlots(slots)
        self.alias_ttl_s = alias_ttl_s
        self._resolved: dict[str, tuple[float, AdapterVersion]] = {}
        self._forward_lock = threading.Lock()  # one batched forward at a time per replica

    # -- adapters ------------------------------------------------------------------------
    def resolve(self, ref: str) -> AdapterVersion:
        """Resolve a reference, caching it for ``alias_ttl_s`` (exact versions never change)."""
        now = time.monotonic()
        cached = self._resolved.get(ref)
        if cached is not None and (":" in ref or now - cached[0] < self.alias_ttl_s):
            return cached[1]
        version = self.registry.resolve(ref)
        self._resolved[ref] = (now, version)
        return version

    def _load_into(self, version: AdapterVersion, slot: int) -> None:
        if version.base_model.fingerprint != self.fingerprint:
            raise AdapterMismatch(
                f"adapter {version.ref} was trained on base {version.base_model.name} "
                f"({version.base_model.fingerprint[:12]}…), this server serves "
                f"{self.fingerprint[:12]}…"
            )
        _, directory = self.registry.fetch(version.ref)  # verified download into the cache
        weights = load_file(str(directory / "adapter_model.safetensors"))
        scaling = version.alpha / (version.r**0.5 if version.use_rslora else version.r)
        found = set()
        for path, layer in self.layers.items():
            key = f"base_model.model.{path}.lora_A.weight"
            if key in weights:
                a, b = weights[key], weights[key.replace("lora_A", "lora_B")]
                if (
                    a.shape[1] != layer.base_layer.in_features
                    or b.shape[0] != layer.base_layer.out_features
                ):
                    raise AdapterMismatch(f"adapter {version.ref} does not fit {path}")
                layer.load_slot(slot, a, b, scaling)
                found.add(key)
            else:
                layer.clear_slot(slot)
        missing = {k for k in weights if k.endswith("lora_A.weight")} - found
        if missing:
            raise AdapterMismatch(
                f"adapter {version.ref} adapts modules this server does not serve: "
                f"{sorted(missing)[:3]}"
            )

    # -- requests ------------------------------------------------------------------------
    def complete(self, requests: list[tuple[str, str | None]], *, max_new_tokens: int = 32,
                 ) -> list[Completion]:  # fmt: skip
        """Greedy completions for (prompt, adapter ref or None for the base), one batch."""
        results: list[Completion | None] = [None] * len(requests)
        rows: list[int] = []
        slot_ids: list[int] = []
        held: list[int] = []
        try:
            for i, (_, ref) in enumerate(requests):
                if ref is None:
                    rows.append(i)
                    slot_ids.append(BASE_SLOT)
                    continue
                version: AdapterVersion | None = None
                try:
                    version = self.resolve(ref)
                    v = version
                    slot = self.slots.acquire(v.ref, lambda s, v=v: self._load_into(v, s))
                except (StorageError, AdapterMismatch, ValueError) as exc:
                    if version is not None:  # never keep a slot for bytes that failed
                        self.slots.evict(version.ref)
                    results[i] = Completion(None, None, f"{type(exc).__name__}: {exc}")
                    continue
                held.append(slot)
                rows.append(i)
                slot_ids.append(slot)
                results[i] = Completion(None, version.ref)
            if rows:
                with self._forward_lock:
                    texts = generate_mixed(
                        self.model, self.tokenizer, self.layers,
                        [requests[i][0] for i in rows], slot_ids, max_new_tokens=max_new_tokens,
                    )  # fmt: skip
                for i, text in zip(rows, texts, strict=True):
                    prior = results[i]
                    results[i] = Completion(text, prior.adapter if prior else None)
        finally:
            for slot in held:
                self.slots.release(slot)
        return [r if r is not None else Completion(None, None, "not served") for r in results]

    def describe(self) -> dict[str, Any]:
        return {"slots": self.slots.n, "resident": self.slots.resident(),
                "stats": vars(self.slots.stats)}  # fmt: skip
