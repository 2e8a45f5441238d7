"""The serving engine of one replica: base once, adapters in tiers, mixed batches.

Plain Python; the Ray Serve deployment (``deployments.py``) is a thin shell around it. A
request names an adapter reference (``ns/name``, ``ns/name:3``, ``ns/name@alias``) or the base.
References resolve through the catalog with a short TTL, so promoting an alias moves traffic
without a redeploy. An adapter reaches a device slot through tiers:

    device slots (LRU, pinned while a batch runs)  ←  host memory (parsed tensors, LRU)
        ←  node disk cache (SHA-256 verified, one download per node)  ←  object store

Before an adapter enters the host tier its base fingerprint and every shape are checked
against the served base. A request whose adapter cannot be served fails alone; the rest of
the batch is served. In merged mode the replica serves exactly one adapter folded into the
base weights (no LoRA work per token).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from storage.catalog.domain import AdapterVersion
from storage.errors import IntegrityError, InvalidName, NotFound, StorageError
from storage.fingerprint import fingerprint_model_dir
from storage.registry import Registry
from workers.base_model import load_base
from workers.lora import LoraError, load_adapter, match_target_modules, remove_lora
from workers.lora.io import (
    check_adapter_shapes,
    parse_adapter_keys,
    read_adapter_config,
    read_adapter_weights,
)
from workers.lora.merge import merge_lora
from workers.serving.decode import DecodeRow, decode_batch
from workers.serving.multi_lora import BASE_SLOT, MultiLoraLinear, to_multi_lora
from workers.serving.resolver import RefResolver
from workers.serving.slots import AdapterSlots, NoFreeSlot

log = logging.getLogger(__name__)


class AdapterMismatch(ValueError):
    """The adapter was trained on another base (fingerprint) or does not fit its shapes."""


class RequestRejected(ValueError):
    """A request this replica cannot serve (e.g. another adapter than the merged one)."""


# What went wrong with a request, in the engine's words; the ingress (the HTTP layer, and
# only it) turns a kind into a status code.
ErrorKind = Literal["not_found", "invalid", "mismatch", "busy", "corrupt", "internal"]


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of a request error."""
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, InvalidName | RequestRejected):
        return "invalid"
    if isinstance(exc, AdapterMismatch | LoraError):
        return "mismatch"
    if isinstance(exc, NoFreeSlot):
        return "busy"
    if isinstance(exc, IntegrityError):
        return "corrupt"  # the stored bytes are bad: a fault upstream of this server
    return "internal"


@dataclass(frozen=True)
class HostAdapter:
    """An adapter parsed into host memory, checked against the served base."""

    version: AdapterVersion
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A, B)
    scaling: float
    nbytes: int


@dataclass(frozen=True)
class GenRequest:
    """One completion request: a prompt (text or token ids) and an adapter reference."""

    prompt: str | Sequence[int]
    adapter: str | None = None  # None: the bare base
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenResult:
    """One request's answer, or its error (the batch goes on without it)."""

    text: str | None = None
    adapter: str | None = None  # the exact version used, e.g. "team/x:3"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    kind: ErrorKind | None = None  # set with ``error``


@dataclass
class Completion:
    """A greedy completion (the engine's simple entry point)."""

    text: str | None
    adapter: str | None
    error: str | None = None


@dataclass
class TierStats:
    host_hits: int = 0
    host_misses: int = 0
    load_ms: list[float] = field(default_factory=list)
    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    max_adapters: int = 0  # most distinct adapters (base counted as one) in one forward pass


class ServingEngine:
    """Base model + adapter tiers + registry for one replica.

    Args:
        base_dir: the served base (Hugging Face directory).
        registry: catalog + object store + node cache.
        slots: device slots (adapters in one forward pass at most).
        max_rank: rank the slots are padded to; higher-rank adapters are refused.
        targets: modules that get slots (``"all-linear"`` serves any adapter of the base).
        alias_ttl_s: how long a resolved ``name`` / ``@alias`` reference is trusted.
        host_adapters: adapters kept parsed in host memory (the tier above the disk cache).
        merged: serve only this adapter, merged into the base weights.
    """

    def __init__(
        self,
        base_dir: str | Path,
        registry: Registry,
        *,
        slots: int = 4,
        max_rank: int = 64,
        targets: tuple[str, ...] | str = "all-linear",
        alias_ttl_s: float = 2.0,
        host_adapters: int = 64,
        merged: str | None = None,
    ) -> None:
        self.registry = registry
        self.model, self.tokenizer = load_base(base_dir)
        self.model.eval()
        self.fingerprint = fingerprint_model_dir(base_dir).sha256
        self.resolve = RefResolver(registry.resolve, ttl_s=alias_ttl_s)
        self.host_capacity = host_adapters
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._staging: dict[str, Future[HostAdapter]] = {}
        self._host_lock = threading.Lock()
        self._forward_lock = threading.Lock()  # one batched forward at a time per replica
        self.tier_stats = TierStats()
        self.merged: AdapterVersion | None = None
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slots = AdapterSlots(max(slots, 1))
        if merged is not None:
            self._merge(merged)
        else:
            paths = match_target_modules(self.model, targets)
            self.layers = to_multi_lora(self.model, paths, n_slots=slots, max_rank=max_rank)

    # -- adapters ------------------------------------------------------------------------
    def stage(self, version: AdapterVersion) -> HostAdapter:
        """Bring ``version`` into host memory (verified, checked); one load per adapter.

        Raises:
            AdapterMismatch: another base, or shapes this server cannot hold.
            IntegrityError and other StorageErrors: from the node cache / object store.
        """
        key = version.ref
        with self._host_lock:
            hit = self._host.get(key)
            if hit is not None:
                self._host.move_to_end(key)
                self.tier_stats.host_hits += 1
                return hit
            future = self._staging.get(key)
            owner = future is None
            if future is None:
                self.tier_stats.host_misses += 1
                future = Future()
                self._staging[key] = future
        if not owner:
            return future.result()
        try:
            start = time.perf_counter()
            adapter = self._read(version)
            self.tier_stats.load_ms.append((time.perf_counter() - start) * 1000)
        except BaseException as exc:
            with self._host_lock:
                del self._staging[key]
            future.set_exception(exc)
            raise
        with self._host_lock:
            del self._staging[key]
            self._host[key] = adapter
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)
        future.set_result(adapter)
        return adapter

    def _read(self, version: AdapterVersion) -> HostAdapter:
        if version.base_model.fingerprint != self.fingerprint:
            raise AdapterMismatch(
                f"adapter {version.ref} was trained on base {version.base_model.name} "
                f"(fingerprint {version.base_model.fingerprint[:12]}), but this server serves "
                f"a different base (fingerprint {self.fingerprint[:12]})"
            )
        _, directory = self.registry.fetch(version.ref)  # verified download into the cache
        weights = read_adapter_weights(directory)
        pairs = parse_adapter_keys(weights)
        config = read_adapter_config(directory)
        try:
            check_adapter_shapes(self.model, config, pairs)
        except LoraError as exc:
            raise AdapterMismatch(f"adapter {version.ref}: {exc}") from None
        if self.layers:
            unserved = sorted(set(pairs) - set(self.layers))
            if unserved:
                raise AdapterMismatch(
                    f"adapter {version.ref} adapts modules this server does not serve: "
                    f"{unserved[:3]}"
                )
            rank = next(iter(self.layers.values())).max_rank
            if config.r > rank:
                raise AdapterMismatch(
                    f"adapter {version.ref} has rank {config.r}; this server's slots hold "
                    f"rank ≤ {rank} (start it with a larger --max-rank)"
                )
        modules = {p: (pair["A"], pair["B"]) for p, pair in pairs.items()}
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return HostAdapter(version, modules, config.scaling, nbytes)

    def _load_into(self, adapter: HostAdapter, slot: int) -> None:
        for path, layer in self.layers.items():
            pair = adapter.modules.get(path)
            if pair is None:
                layer.clear_slot(slot)
            else:
                layer.load_slot(slot, pair[0], pair[1], adapter.scaling)

    def warm(self, ref: str) -> int:
        """Make ``ref`` ready to serve: staged in host memory and loaded into a device slot."""
        version = self.resolve(ref)
        if self.merged is not None:
            return BASE_SLOT
        adapter = self.stage(version)
        slot = self.slots.acquire(version.ref, lambda s: self._load_into(adapter, s))
        self.slots.release(slot)
        return slot

    def unload(self, ref: str, *, disk: bool = False) -> bool:
        """Drop an adapter from the slots and host memory (and the node disk cache)."""
        version = self.resolve(ref)
        dropped = self.slots.evict(version.ref) is not None
        with self._host_lock:
            dropped = self._host.pop(version.ref, None) is not None or dropped
        if disk:
            self.registry.cache.remove(version)
        return dropped

    def _merge(self, ref: str) -> None:
        version = self.resolve(ref)
        if version.base_model.fingerprint != self.fingerprint:
            raise AdapterMismatch(f"adapter {version.ref} was trained on another base")
        _, directory = self.registry.fetch(version.ref)
        load_adapter(self.model, directory)
        merge_lora(self.model)
        remove_lora(self.model)  # plain linear layers again: not even a branch per token
        self.merged = version
        log.info("serving %s merged into the base", version.ref)

    # -- requests ------------------------------------------------------------------------
    def _prepare(self, req: GenRequest) -> tuple[int, AdapterVersion | None]:
        """The slot a request decodes with (pinned), resolving and loading its adapter."""
        if self.merged is not None:
            if req.adapter is None or self.resolve(req.adapter).ref != self.merged.ref:
                raise RequestRejected(
                    f"this deployment serves only {self.merged.ref} (merged); asked for "
                    f"{req.adapter or 'the base'}"
                )
            return BASE_SLOT, self.merged
        if req.adapter is None:
            return BASE_SLOT, None
        version = self.resolve(req.adapter)
        adapter = self.stage(version)
        slot = self.slots.acquire(version.ref, lambda s: self._load_into(adapter, s))
        return slot, version

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        on_step: Callable[[list[str | None]], None] | None = None,
        slot_wait_s: float = 30.0,
    ) -> list[GenResult]:
        """Answer a batch; ``on_step`` gets a text delta per request per decoding step.

        Requests for up to ``slots`` distinct adapters (plus any number for the base) share
        one decode; requests beyond that wait for the next round. Requests that cannot be
        served get an error result (and ``None`` deltas) and do not hold the others back.
        """
        results = [GenResult() for _ in requests]
        ids: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                ids[i] = (
                    list(self.tokenizer(req.prompt)["input_ids"])
                    if isinstance(req.prompt, str)
                    else list(req.prompt)
                )
                if not ids[i]:
                    raise RequestRejected("empty prompt")
            except ValueError as exc:
                results[i] = GenResult(error=str(exc), kind="invalid")
                ids.pop(i, None)
        pending = list(ids)
        waited_since: float | None = None
        while pending:
            deferred = self._round(requests, pending, ids, results, on_step)
            if len(deferred) == len(pending):  # no slot at all: others' batches pin them all
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > slot_wait_s:
                    for i in deferred:
                        results[i] = GenResult(error="no free adapter slot", kind="busy")
                    break
                time.sleep(0.01)
            else:
                waited_since = None
            pending = deferred
        return results

    def _round(
        self,
        requests: Sequence[GenRequest],
        pending: list[int],
        ids: dict[int, list[int]],
        results: list[GenResult],
        on_step: Callable[[list[str | None]], None] | None,
    ) -> list[int]:
        """Decode every pending request that gets a slot; returns those that did not."""
        rows: list[DecodeRow] = []
        index: list[int] = []
        held: list[int] = []
        deferred: list[int] = []
        try:
            for i in pending:
                req = requests[i]
                version = None
                try:
                    slot, version = self._prepare(req)
                except NoFreeSlot:
                    deferred.append(i)
                    continue
                except (StorageError, AdapterMismatch, LoraError, ValueError) as exc:
                    if version is not None or isinstance(exc, IntegrityError | NotFound):
                        # never keep bytes that failed, nor a version the catalog deleted
                        self._forget(req.adapter)
                    results[i] = GenResult(error=str(exc), kind=error_kind(exc))
                    continue
                if slot != BASE_SLOT:
                    held.append(slot)
                results[i].adapter = version.ref if version else None
                results[i].prompt_tokens = len(ids[i])
                index.append(i)
                rows.append(DecodeRow(ids[i], slot, req.max_tokens, req.temperature, req.top_p,
                                      req.seed, tuple(req.stop)))  # fmt: skip
            if not rows:
                return deferred
            step_cb = None
            if on_step is not None:
                n = len(requests)

                def step_cb(deltas: list[str | None]) -> None:
                    full: list[str | None] = [None] * n
                    for i, d in zip(index, deltas, strict=True):
                        full[i] = d
                    on_step(full)

            st = self.tier_stats
            st.batches += 1
            st.rows += len(rows)
            st.max_rows = max(st.max_rows, len(rows))
            st.max_adapters = max(st.max_adapters, len({r.slot for r in rows}))
            with self._forward_lock:
                outs = decode_batch(self.model, self.tokenizer, self.layers, rows, on_step=step_cb)
            for i, o in zip(index, outs, strict=True):
                r = results[i]
                r.text, r.finish_reason = o.text, o.finish_reason
                r.completion_tokens = len(o.token_ids)
                if o.error is not None:  # this row failed alone; its batch-mates are answered
                    r.error, r.kind = o.error, "internal"
        finally:
            for slot in held:
                self.slots.release(slot)
        return deferred

    def _forget(self, ref: str | None) -> None:
        if ref is None:
            return
        version = self.resolve.cached(ref)
        if version is not None:
            self.slots.evict(version.ref)
            with self._host_lock:
                self._host.pop(version.ref, None)

    def complete(
        self, requests: list[tuple[str, str | None]], *, max_new_tokens: int = 32
    ) -> list[Completion]:
        """Greedy completions for (prompt, adapter ref or None for the base), one batch."""
        out = self.generate([GenRequest(p, a, max_new_tokens) for p, a in requests])
        return [Completion(r.text, r.adapter, r.error) for r in out]

    def stats(self) -> dict[str, Any]:
        """Residency and counters per tier (for /v1/serving/stats and metrics)."""
        with self._host_lock:
            host = list(self._host)
            host_bytes = sum(a.nbytes for a in self._host.values())
        loads = self.tier_stats.load_ms
        s = self.slots.stats
        return {
            "merged": self.merged.ref if self.merged else None,
            "slots": {"n": self.slots.n, "resident": self.slots.resident(), "hits": s.hits,
                      "misses": s.misses, "loads": s.loads, "evictions": s.evictions},
            "host": {"capacity": self.host_capacity, "resident": host, "bytes": host_bytes,
                     "hits": self.tier_stats.host_hits, "misses": self.tier_stats.host_misses,
                     "load_ms_p50": statistics.median(loads) if loads else None},
            "disk": {"downloads": self.registry.cache.downloads},
            "batches": {"count": self.tier_stats.batches, "rows": self.tier_stats.rows,
                        "max_rows": self.tier_stats.max_rows,
                        "max_adapters": self.tier_stats.max_adapters},
        }  # fmt: skip
