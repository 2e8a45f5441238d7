"""The serving engine of one replica: base once, adapters in tiers, continuous batching.

Plain Python; the Ray Serve deployment (``deployments.py``) is a thin shell around it. A
request names an adapter reference (``ns/name``, ``ns/name:3``, ``ns/name@alias``) or the base,
or comes with the exact version its caller resolved (the ingress does: one resolution per
request). References resolve through the catalog with a short TTL, so promoting an alias moves
traffic without a redeploy. ``submit`` hands a request to the replica's decode loop
(``scheduler.py``), where it joins the running batch at the next step and leaves the step it
ends; rows of any adapters and the base share every forward pass. An adapter reaches a device
slot through tiers:

    device slots (LRU, pinned while a request runs)  ←  host memory (parsed tensors, LRU)
        ←  node disk cache (SHA-256 verified, one download per node)  ←  object store

Before an adapter enters the host tier its base fingerprint and every shape are checked
against the served base. A request whose adapter cannot be served fails alone; the rest of
the batch is served. Every ``alias_ttl_s`` a sweeper asks the catalog whether the resident
versions still exist and drops deleted ones from every tier. In merged mode the replica
serves exactly one adapter folded into the base weights (no LoRA work per token).
"""

from __future__ import annotations

import dataclasses
import functools
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
from workers.lora.adalora import to_plain_lora
from workers.lora.io import (
    check_adapter_shapes,
    parse_adapter_keys,
    read_adapter_config,
    read_adapter_weights,
)
from workers.lora.merge import merge_lora
from workers.serving.decode import DecodeRow, RowOutput, choice_seed
from workers.serving.decode_loop import DecodeLoop, Overloaded, TenantLimits, Ticket
from workers.serving.kv import kv_bytes_per_token
from workers.serving.logprobs import TokenLogprob
from workers.serving.multi_lora import BASE_SLOT, MultiLoraLinear, to_multi_lora
from workers.serving.options import DEFAULT_SLOTS
from workers.serving.prefix_cache import PrefixCache, PrefixStats, prefix_root
from workers.serving.resolver import RefResolver
from workers.serving.slots import AdapterSlots, NoFreeSlot
from workers.serving.stepper import StepDecoder
from workers.tool_calls import ToolPlan

log = logging.getLogger(__name__)


class AdapterMismatch(ValueError):
    """The adapter was trained on another base (fingerprint) or does not fit its shapes."""


class RequestRejected(ValueError):
    """A request this replica cannot serve (e.g. another adapter than the merged one)."""


# What went wrong with a request, in the engine's words; the ingress (the HTTP layer, and
# only it) turns a kind into a status code.
ErrorKind = Literal["not_found", "invalid", "mismatch", "busy", "overloaded", "corrupt", "internal"]


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
    if isinstance(exc, Overloaded):
        return "overloaded"  # the queue is full: come back shortly
    if isinstance(exc, IntegrityError):
        return "corrupt"  # the stored bytes are bad: a fault upstream of this server
    if isinstance(exc, ValueError):
        return "invalid"  # e.g. a prompt too long for the context or the KV budget
    return "internal"


@dataclass(frozen=True)
class HostAdapter:
    """An adapter parsed into host memory, checked against the served base."""

    version: AdapterVersion
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (A, B, m)
    scaling: float
    nbytes: int


@dataclass(frozen=True)
class GenRequest:
    """One prompt (text or token ids) for an adapter reference, with ``n`` choices.

    ``logprobs``: report each sampled token's log-probability with this many most likely
    tokens (None: none); with ``echo`` the prompt's tokens get theirs too. ``prompt_index``:
    the prompt's place in its API request (it numbers the choices and mixes the seeds).
    ``namespace``: the tenant it counts against (queues, rows, slots).
    """

    prompt: str | Sequence[int]
    adapter: str | None = None  # None: the bare base
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    namespace: str = ""
    prompt_index: int = 0
    schema: dict[str, Any] | None = None  # a JSON schema the answer must conform to
    tools: ToolPlan | None = None  # the calls a chat answer may (or must) make


@dataclass
class GenResult:
    """One choice's answer, or its error (the batch goes on without it)."""

    text: str | None = None
    adapter: str | None = None  # the exact version used, e.g. "team/x:3"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    kind: ErrorKind | None = None  # set with ``error``
    index: int = 0  # the choice's index in its API response (prompt-major)
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


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


class ServingEngine:
    """Base model + adapter tiers + registry for one replica.

    Args:
        base_dir: the served base (Hugging Face directory).
        registry: catalog + object store + node cache.
        slots: device slots (adapters in one forward pass at most).
        max_rank: rank the slots are padded to; higher-rank adapters are refused.
        targets: modules that get slots (``"all-linear"`` serves any adapter of the base).
        alias_ttl_s: how long a resolved ``name`` / ``@alias`` reference is trusted; resident
            versions are also checked against the catalog this often (deleted ones dropped).
        host_adapters: adapters kept parsed in host memory (the tier above the disk cache);
            None: the caller evicts (``forget``) — the Ray deployment lets Serve's
            multiplexed-model LRU decide, so one LRU governs host memory, not two.
        merged: serve only this adapter, merged into the base weights.
        max_rows: requests decoded together at most.
        kv_cache_mb: KV-cache budget (running rows and cached prefixes); admission waits
            (or the planner preempts) when it is full.
        prefill_chunk: prompt tokens prefilled per step at most (running rows wait no longer).
        max_queue: waiting requests at most; beyond, ``submit`` answers ``overloaded``.
        tenants: per-namespace caps (queue, rows, slots, KV); fairness between namespaces
            is the planner's whatever the caps.
        kv_share_per_namespace: the share of the KV budget one namespace's rows may hold.
        prefix_cache: keep prompt prefixes' KV (in blocks, inside ``kv_cache_mb``).
    """

    def __init__(
        self,
        base_dir: str | Path,
        registry: Registry,
        *,
        slots: int = DEFAULT_SLOTS,
        max_rank: int = 64,
        targets: tuple[str, ...] | str = "all-linear",
        alias_ttl_s: float = 2.0,
        host_adapters: int | None = 64,
        merged: str | None = None,
        max_rows: int = 32,
        kv_cache_mb: float = 512.0,
        prefill_chunk: int = 256,
        max_queue: int = 1024,
        tenants: TenantLimits | None = None,
        kv_share_per_namespace: float | None = None,
        prefix_cache: bool = True,
    ) -> None:
        self.registry = registry
        self.model, self.tokenizer = load_base(base_dir)
        self._grammars: Any = None  # a GrammarCache, made at the first constrained request
        self.model.eval()
        self.fingerprint = fingerprint_model_dir(base_dir).sha256
        self.resolve = RefResolver(registry.resolve, ttl_s=alias_ttl_s)
        self.host_capacity = host_adapters
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._staging: dict[str, Future[HostAdapter]] = {}
        self._host_lock = threading.Lock()
        self.tier_stats = TierStats()
        self.merged: AdapterVersion | None = None
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slots = AdapterSlots(max(slots, 1))
        if merged is not None:
            self._merge(merged)
        else:
            paths = match_target_modules(self.model, targets)
            self.layers = to_multi_lora(self.model, paths, n_slots=slots, max_rank=max_rank)
        config = self.model.config
        per_token = kv_bytes_per_token(config, next(self.model.parameters()).dtype)
        self.kv_tokens = max(1, int(kv_cache_mb * 2**20) // per_token)
        context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.prefix_cache = PrefixCache() if prefix_cache else None
        decoder = StepDecoder(self.model, self.tokenizer, self.layers, max_rows=max_rows,
                              kv_tokens=self.kv_tokens, max_len=context,
                              prefill_chunk=prefill_chunk,
                              prefix_cache=self.prefix_cache)  # fmt: skip
        tenants = tenants or TenantLimits()
        if kv_share_per_namespace is not None:
            share = max(1, int(kv_share_per_namespace * self.kv_tokens))
            tenants = dataclasses.replace(tenants, max_kv_tokens=share)
        self.loop = DecodeLoop(decoder, self.slots, max_queue=max_queue, tenants=tenants)
        self._closed = threading.Event()
        if alias_ttl_s > 0 and self.merged is None:
            threading.Thread(target=self._sweep_loop, args=(max(alias_ttl_s, 0.5),),
                             name="lorafleet-sweep", daemon=True).start()  # fmt: skip

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
            while self.host_capacity is not None and len(self._host) > self.host_capacity:
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
        _, directory = self.registry.fetch(version)  # verified download into the cache
        weights = read_adapter_weights(directory)
        finite = {k: bool(torch.isfinite(t).all()) for k, t in weights.items()
                  if t.is_floating_point()}  # fmt: skip
        bad = next((k for k, ok in finite.items() if not ok), None)
        if bad is not None:  # published before publishing checked: refused here too
            raise AdapterMismatch(f"adapter {version.ref}: tensor {bad} holds NaN or inf")
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
        if config.adalora is not None:  # served as plain LoRA: the kept triplets, Λ in A
            plain = {p: to_plain_lora(pair["A"], pair["B"], pair["E"]) for p, pair in pairs.items()}
            modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {
                p: (a, b, None) for p, (a, b) in plain.items()
            }
        else:
            modules = {p: (pair["A"], pair["B"], pair.get("M")) for p, pair in pairs.items()}
        if self.layers:
            rank = next(iter(self.layers.values())).max_rank
            r = max(m[0].shape[0] for m in modules.values())  # AdaLoRA: the kept rank
            if r > rank:
                raise AdapterMismatch(
                    f"adapter {version.ref} has rank {r}; this server's slots hold "
                    f"rank ≤ {rank} (start it with a larger --max-rank)"
                )
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return HostAdapter(version, modules, config.scaling, nbytes)

    def _load_into(self, adapter: HostAdapter, slot: int) -> None:
        for path, layer in self.layers.items():
            pair = adapter.modules.get(path)
            if pair is None:
                layer.clear_slot(slot)
            else:
                layer.load_slot(slot, pair[0], pair[1], adapter.scaling, magnitude=pair[2])

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
        self.loop.call_soon(functools.partial(self.loop.decoder.drop_prefixes, version.ref))
        if disk:
            self.registry.cache.remove(version)
        return dropped

    def _merge(self, ref: str) -> None:
        version = self.resolve(ref)
        if version.base_model.fingerprint != self.fingerprint:
            raise AdapterMismatch(f"adapter {version.ref} was trained on another base")
        _, directory = self.registry.fetch(version)
        load_adapter(self.model, directory)
        merge_lora(self.model)
        remove_lora(self.model)  # plain linear layers again: not even a branch per token
        self.merged = version
        log.info("serving %s merged into the base", version.ref)

    # -- requests ------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def _target(
        self, adapter: str | None, version: AdapterVersion | None
    ) -> tuple[AdapterVersion | None, HostAdapter | None]:
        """The exact version a request runs on (None: the base) and its host copy."""
        if self.merged is not None:
            ref = version.ref if version else adapter and self.resolve(adapter).ref
            if ref != self.merged.ref:
                raise RequestRejected(
                    f"this deployment serves only {self.merged.ref} (merged); asked for "
                    f"{adapter or 'the base'}"
                )
            return self.merged, None
        if adapter is None:
            return None, None
        try:
            version = version or self.resolve(adapter)
            return version, self.stage(version)
        except (NotFound, IntegrityError):  # never keep a deleted or corrupt version
            self.forget(version.ref if version else None)
            raise

    def _grammar(self, req: GenRequest) -> Any:
        """The request's grammar compiled for this base's tokenizer (once per schema or tool
        set: a cache); None when it has none.

        Raises:
            GrammarError (a ValueError: the request is invalid), naming the part.
        """
        if req.schema is None and req.tools is None:
            return None
        from workers.serving.grammar import GrammarCache

        with self._host_lock:
            if self._grammars is None:
                vocab = int(getattr(self.model.config, "vocab_size", 0)) or len(self.tokenizer)
                self._grammars = GrammarCache(self.tokenizer, max(vocab, len(self.tokenizer)))
        if req.tools is None:
            return self._grammars.compiled(req.schema)
        return self._grammars.compiled_tools(req.tools, req.schema)

    def grammars_ready(self, requests: Sequence[GenRequest]) -> bool:
        """Whether every grammar ``requests`` need is compiled already (compiling takes
        milliseconds to seconds: not on an event loop)."""
        needed = [r for r in requests if r.schema is not None or r.tools is not None]
        if not needed:
            return True
        cache = self._grammars
        return cache is not None and all(cache.ready(r.schema, r.tools) for r in needed)

    def submits_quickly(self, adapter: str | None, version: AdapterVersion | None) -> bool:
        """Whether ``submit`` for ``adapter`` needs no storage (the base, or a version already
        in host memory): an event loop may then call it directly."""
        if adapter is None or self.merged is not None:
            return True
        if version is None:
            return False
        with self._host_lock:
            return version.ref in self._host

    def submit(
        self,
        requests: GenRequest | Sequence[GenRequest],
        on_done: Callable[[list[GenResult]], None],
        on_delta: Callable[[int, str, list[TokenLogprob]], None] | None = None,
        *,
        version: AdapterVersion | None = None,
    ) -> list[Ticket] | None:
        """Queue the prompts of one API request (one adapter, the same settings) for the
        decode loop, all or none.

        ``on_delta(choice, text, logprobs)`` gets each choice's new text (and new token
        log-probabilities, when asked) as it is decoded; ``on_done`` gets every choice's result
        once (prompt-major: choice ``prompt_index · n + j``), each carrying the error when the
        request failed. Both run on the loop thread. ``version``: the exact adapter version,
        when the caller resolved it already (the ingress does: one resolution per request).
        Returns the tickets (for ``cancel``), or None when the request failed at once
        (``on_done`` was called).
        """
        reqs = [requests] if isinstance(requests, GenRequest) else list(requests)
        first = reqs[0]
        results: list[GenResult] = []
        try:
            target, host = self._target(first.adapter, version)
            name = target.ref if target is not None else None
            key = None if self.merged is not None or target is None else target.ref
            load = functools.partial(self._load_into, host) if host is not None else None
            root = prefix_root(self.fingerprint, name, target.digest if target else None)
            tickets, pending = [], [len(reqs)]
            by_index: dict[int, GenResult] = {}
            lock = threading.Lock()
            for req in reqs:
                ids = self._prompt_ids(req.prompt)
                if not ids:
                    raise RequestRejected("empty prompt")
                prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
                grammar = self._grammar(req)
                rows = [DecodeRow(ids, BASE_SLOT, req.max_tokens, req.temperature, req.top_p,
                                  choice_seed(req.seed, req.prompt_index, j), tuple(req.stop),
                                  logprobs=req.logprobs, prompt_logprobs=prompt_lp,
                                  deltas=on_delta is not None, grammar=grammar)
                        for j in range(req.n)]  # fmt: skip
                base_index = req.prompt_index * req.n

                def done(outs: list[RowOutput], error: tuple[str, str] | None, *,
                         ids: list[int] = ids, base_index: int = base_index,
                         req: GenRequest = req) -> None:  # fmt: skip
                    for j, out in enumerate(outs):
                        r = GenResult(out.text, name, out.finish_reason, len(ids),
                                      len(out.token_ids), index=base_index + j, prompt_ids=ids,
                                      token_ids=list(out.token_ids))  # fmt: skip
                        if req.logprobs is not None:
                            r.logprobs = list(out.logprobs)
                            if req.echo:
                                r.prompt_logprobs = list(out.prompt_logprobs)
                        if error is not None:
                            r.error, r.kind = error[0], error[1]  # type: ignore[assignment]
                        by_index[r.index] = r
                    with lock:
                        pending[0] -= 1
                        last = pending[0] == 0
                    if last:
                        on_done([by_index[i] for i in sorted(by_index)])

                tickets.append(Ticket(rows, on_delta, done, adapter=key, load=load,
                                      namespace=req.namespace, cache_root=root,
                                      first_choice=base_index))  # fmt: skip
            self.loop.submit(tickets)
            return tickets
        except (StorageError, AdapterMismatch, LoraError, ValueError, Overloaded) as exc:
            err = GenResult(adapter=None, error=str(exc), kind=error_kind(exc))
            results.append(err)
            on_done(results)
            return None

    def cancel(self, tickets: Sequence[Ticket] | Ticket) -> None:
        """Stop decoding a request whose caller went away."""
        for t in [tickets] if isinstance(tickets, Ticket) else tickets:
            self.loop.cancel(t)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Answer ``requests`` (each submitted alone; they share steps with anything running):
        their choices in order, ``n`` per request.

        A request that cannot be served gets an error result per choice; the others are
        answered.
        """
        results: list[list[GenResult] | None] = [None] * len(requests)
        done = threading.Semaphore(0)

        def finisher(i: int) -> Callable[[list[GenResult]], None]:
            def finish(result: list[GenResult]) -> None:
                results[i] = result
                done.release()

            return finish

        for i, req in enumerate(requests):
            self.submit(req, finisher(i))
        for _ in requests:
            done.acquire()
        out: list[GenResult] = []
        for req, rs in zip(requests, results, strict=True):
            assert rs is not None
            if len(rs) == 1 and rs[0].error is not None and req.n > 1:
                rs = [dataclasses.replace(rs[0], index=j) for j in range(req.n)]
            out.extend(rs)
        return out

    def forget(self, ref: str | None) -> None:
        """Drop an exact version from the slot and host tiers and its cached prefixes
        (deleted, or bad bytes)."""
        if ref is None:
            return
        self.slots.evict(ref)
        with self._host_lock:
            self._host.pop(ref, None)
        self.loop.call_soon(functools.partial(self.loop.decoder.drop_prefixes, ref))

    def drop_host(self, ref: str) -> None:
        """Drop an exact version from host memory (its device slot, if any, stays)."""
        with self._host_lock:
            self._host.pop(ref, None)

    def sweep_deleted(self) -> list[str]:
        """Drop resident versions the catalog no longer has; returns their refs."""
        with self._host_lock:
            resident = set(self._host)
        resident |= set(self.slots.resident())
        if not resident:
            return []
        try:
            ready = self.registry.ready(resident)  # one query for them all
        except StorageError:  # the catalog is away: keep serving, look again later
            log.warning("could not check resident versions against the catalog")
            return []
        gone = sorted(resident - ready)
        for ref in gone:
            self.forget(ref)
        if gone:
            log.info("dropped deleted versions from this replica: %s", gone)
        return gone

    def _sweep_loop(self, period_s: float) -> None:
        while not self._closed.wait(period_s):
            try:
                self.sweep_deleted()
            except Exception:  # a sweep must never take the replica down
                log.exception("sweeping deleted versions failed")

    def close(self) -> None:
        """Stop the decode loop and the sweeper."""
        self._closed.set()
        self.loop.close()

    def complete(
        self, requests: list[tuple[str, str | None]], *, max_new_tokens: int = 32
    ) -> list[Completion]:
        """Greedy completions for (prompt, adapter ref or None for the base)."""
        out = self.generate([GenRequest(p, a, max_new_tokens) for p, a in requests])
        return [Completion(r.text, r.adapter, r.error) for r in out]

    def stats(self) -> dict[str, Any]:
        """Residency and counters per tier (for /v1/serving/stats and metrics)."""
        with self._host_lock:
            host = list(self._host)
            host_bytes = sum(a.nbytes for a in self._host.values())
        loads = self.tier_stats.load_ms
        s = self.slots.stats
        loop = self.loop.stats
        return {
            "merged": self.merged.ref if self.merged else None,
            "slots": {"n": self.slots.n, "resident": self.slots.resident(), "hits": s.hits,
                      "misses": s.misses, "loads": s.loads, "evictions": s.evictions},
            "host": {"capacity": self.host_capacity, "resident": host, "bytes": host_bytes,
                     "hits": self.tier_stats.host_hits, "misses": self.tier_stats.host_misses,
                     "load_ms_p50": statistics.median(loads) if loads else None},
            "disk": {"downloads": self.registry.cache.downloads},
            "batches": {"count": loop.forwards, "rows": loop.rows, "max_rows": loop.max_rows,
                        "max_adapters": loop.max_adapters, "steps": loop.steps},
            "queue": {"waiting": loop.waiting, "running": loop.running,
                      "admitted": loop.admitted, "rejected": loop.rejected,
                      "preempted": loop.preempted},
            "kv": {"budget_tokens": self.kv_tokens, "bytes": self.loop.decoder.kv.nbytes()},
            "prefix_cache": self._prefix_stats(),
        }  # fmt: skip

    def _prefix_stats(self) -> dict[str, Any]:
        c = self.prefix_cache
        st = c.stats if c is not None else PrefixStats()
        return {"enabled": c is not None, "block_tokens": c.block if c else 0,
                "tokens": c.tokens if c else 0,
                "hits": st.hits, "misses": st.misses, "hit_tokens": st.hit_tokens,
                "miss_tokens": st.miss_tokens, "evicted_blocks": st.evicted_blocks,
                "dropped_blocks": st.dropped_blocks}  # fmt: skip
