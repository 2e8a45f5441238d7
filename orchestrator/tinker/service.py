"""Tinker sessions as lorafleet jobs: accepted requests, their futures, and one worker thread
that carries them out on the training core (``workers.training.sessions.SessionHost``).

A training client's requests run in ``seq_id`` order and are idempotent on
``(model_id, seq_id)``: a retried submission gets the first one's future. Requests of
different models that are ready at once run together — every ready ``forward_backward``
shares one base forward. Each training client is a job in the catalog (``kind: tinker``,
listed with the others, per-step loss events, metered, counted against the namespace's
concurrent-job limit); it ends when its session finishes or stops sending heartbeats, its
state saved to the object store first. Nodes share only the catalog and the object store:
states and sampler weights live there, verified on the way back.

Errors a caller caused are ``UserError`` (the HTTP layer makes them 4xx); a request that fails
in the worker answers its future with ``category: user`` (bad input) or ``server`` (a generic
message; the detail goes to the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.tinker import wire
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.catalog.usage import UsageCount, add_usage
from storage.errors import NotFound, ObjectNotFound, StorageError
from storage.registry import Registry
from storage.settings import Settings
from storage.staging import fetch_staged, stage_dir
from workers.errors import TrainingError

log = logging.getLogger(__name__)

LONG_POLL_S = 25.0  # under the SDK's 45 s read timeout
SAMPLERS_KEPT = 64  # frozen sampler snapshots resident per base (least recently used leave)
MAX_SAMPLES = 128
MAX_NEW_TOKENS = 4096
REAP_EVERY_S = 2.0
FLUSH_EVERY_S = 2.0  # usage counts and step events reach the catalog this often
SEQ_GAP_S = 30.0  # a training client's missing seq_id is skipped after this long
JOB_CHECK_S = 10.0  # how often a model's job is read (a cancel through the jobs API ends it)
PARK_AFTER_S = 60.0  # an idle model's adapter and optimizer state leave the accelerator
FUTURE_TTL_S = 900.0  # an answer is kept this long after it is ready


class UserError(Exception):
    """A request the caller got wrong; ``status`` is the HTTP status the door answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Future:
    """One accepted request's eventual answer."""

    id: str
    proto: bytes | None = None  # the protobuf answer (forward_backward, sample)
    json: dict[str, Any] | None = None
    error: str | None = None
    category: str = "user"
    done: threading.Event = field(default_factory=threading.Event)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished_at: float = 0.0

    def finish(self, *, proto: bytes | None = None, json: dict[str, Any] | None = None,
               error: str | None = None, category: str = "user") -> None:  # fmt: skip
        with self.lock:
            self.proto, self.json, self.error, self.category = proto, json, error, category
            self.finished_at = time.monotonic()
            self.done.set()
            waiters, self.waiters = self.waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, timeout: float) -> bool:
        """Whether the answer is in, waiting at most ``timeout`` seconds (without a thread)."""
        event = asyncio.Event()
        with self.lock:
            if self.done.is_set():
                return True
            self.waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return self.done.is_set()
        return True


@dataclass
class Request:
    kind: str
    payload: Any
    future: Future


@dataclass
class Model:
    """A training client: one member of its base's ``SessionHost``."""

    id: str
    session_id: str
    namespace: str
    base: str  # the registered base
    requested: str  # the name the client asked for
    rank: int = 8
    job_id: str | None = None
    next_seq: int = 0  # 0: its creation (create_model or load_weights) comes first
    pending: dict[int, Request] = field(default_factory=dict)
    step: int = 0
    loss_sum: float = 0.0  # of the forward_backward calls since the last optim_step
    tokens: int = 0
    step_started: float | None = None
    ended: str | None = None  # why no request runs any more
    gap_since: float | None = None  # when it began waiting for a seq_id that is missing
    checked: float = 0.0  # when its job's state was last read
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Sampler:
    id: str
    namespace: str
    base: str
    requested: str
    snapshot: str | None  # None: the base alone
    model_path: str | None


@dataclass
class Session:
    id: str
    namespace: str
    heartbeat: float = field(default_factory=time.monotonic)
    models: list[str] = field(default_factory=list)
    ended: bool = False
    ending: bool = False  # its end is queued


def parse_model_map(value: str | None) -> dict[str, str]:
    """``"meta-llama/Llama-3.2-1B=smollm2,..."`` as a mapping (the setting ``tinker_models``)."""
    out: dict[str, str] = {}
    for part in (value or "").split(","):
        if part.strip():
            name, sep, base = part.partition("=")
            if not sep or not name.strip() or not base.strip():
                raise ValueError(f"tinker_models: {part!r} is not NAME=REGISTERED_BASE")
            out[name.strip()] = base.strip()
    return out


class TinkerService:
    """Sessions, models, samplers and futures of the Tinker-compatible API."""

    def __init__(self, registry: Registry, settings: Settings, *, device: str = "cpu") -> None:
        self.registry = registry
        self.catalog = registry.catalog
        self.store = registry.store
        self.aliases = parse_model_map(settings.tinker_models)
        self.heartbeat_s = settings.tinker_heartbeat_s
        self.device = device
        self.lock = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self.futures: dict[str, Future] = {}
        self.seen: dict[tuple[str, int], str] = {}  # (model or sampler, seq_id) → request id
        self.samples: deque[Request] = deque()
        self.sampler_paths: dict[str, str] = {}  # tinker:// sampler path → snapshot key
        self.hosts: dict[str, Any] = {}  # registered base → SessionHost
        self._thread: threading.Thread | None = None
        self._stop = False
        self._last_reap = 0.0
        self._last_flush = 0.0
        self._usage: dict[tuple[str, str], list[int]] = {}  # (namespace, model) → counts
        self._events: list[tuple[str, str, dict[str, Any]]] = []  # written by _flush

    # -- lifecycle ---------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tinker-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- sessions (answered at once) ------------------------------------------------------
    def create_session(self, namespace: str) -> str:
        sid = uuid.uuid4().hex
        with self.lock:
            self.sessions[sid] = Session(sid, namespace)
        return sid

    def session(self, session_id: Any, namespace: str) -> Session:
        """The caller's live session (another namespace's is not found)."""
        s = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None or s.namespace != namespace:
            raise UserError(f"session {str(session_id)[:80]!r} not found", 404)
        if s.ended:
            raise UserError(f"session {session_id} has ended")
        return s

    def heartbeat(self, session_id: Any, namespace: str) -> None:
        s = self.session(session_id, namespace)
        s.heartbeat = time.monotonic()

    def finish(self, session_id: Any, namespace: str) -> None:
        """End a session: each model's state is saved, its job succeeds."""
        s = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None or s.namespace != namespace:
            raise UserError(f"session {str(session_id)[:80]!r} not found", 404)
        self._submit_control(Request("end_session", (s.id, "succeeded", None), self._future()))

    def model(self, model_id: Any, namespace: str) -> Model:
        wire_id = model_id if isinstance(model_id, str) else ""
        try:
            wire.parse_model_id(wire_id)
        except wire.WireError as exc:
            raise UserError(str(exc), 404) from None
        m = self.models.get(wire_id)
        if m is None or m.namespace != namespace:
            raise UserError(f"model {wire_id} not found", 404)
        return m

    def sampler(self, sampler_id: Any, namespace: str) -> Sampler:
        s = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if s is None or s.namespace != namespace:
            raise UserError(f"sampling session {str(sampler_id)[:80]!r} not found", 404)
        return s

    def resolve_base(self, name: Any) -> str:
        """The registered base behind a Tinker ``base_model`` name."""
        if not isinstance(name, str) or not name:
            raise UserError("base_model: a model name")
        base = self.aliases.get(name, name)
        try:
            repo.get_base_model(self.catalog, name=base)
        except (NotFound, ValueError, StorageError):
            known = ", ".join(sorted(self.aliases)) or "none"
            raise UserError(f"base_model {name[:80]!r} is not a registered base (names mapped "
                            f"by tinker_models: {known})", 404) from None  # fmt: skip
        return base

    # -- submissions ---------------------------------------------------------------------------
    def _future(self) -> Future:
        f = Future(f"req-{uuid.uuid4().hex}")
        self.futures[f.id] = f
        return f

    def _check_quota(self, namespace: str) -> None:
        try:
            limit = repo.get_namespace(self.catalog, name=namespace).max_concurrent_jobs
        except NotFound:
            return
        if limit is None:
            return
        active = [j for j in jobs.list_jobs(self.catalog, states={"starting", "running",
                                                                    "retrying"})
                  if j.namespace == namespace]  # fmt: skip
        if len(active) >= limit:
            raise UserError(f"namespace {namespace} runs {len(active)} jobs, its limit; finish a "
                            "session or wait for a job", 429)  # fmt: skip

    def create_model(self, namespace: str, body: dict[str, Any]) -> tuple[str, str]:
        """Accept a training client's creation; returns (request id, model id)."""
        s = self.session(body.get("session_id"), namespace)
        n = body.get("model_seq_id")
        if not isinstance(n, int) or n < 0:
            raise UserError("model_seq_id: a non-negative integer")
        lora = body.get("lora_config") or {}
        if not isinstance(lora, dict):
            raise UserError("lora_config: an object")
        rank = lora.get("rank", 32)
        if not isinstance(rank, int) or not 1 <= rank <= 256:
            raise UserError("lora_config.rank: an integer from 1 to 256")
        seed = lora.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise UserError("lora_config.seed: an integer")
        optimizer = body.get("optimizer_config") or {}
        if isinstance(optimizer, dict) and optimizer.get("type", "adamw") != "adamw":
            raise UserError(f"optimizer_config.type {str(optimizer.get('type'))[:40]!r}: this "
                            "server trains with adamw")  # fmt: skip
        base = self.resolve_base(body.get("base_model"))
        return self._new_model(s, n, base, str(body["base_model"]), "create", {
            "rank": rank, "seed": seed or 0, "train_attn": bool(lora.get("train_attn", True)),
            "train_mlp": bool(lora.get("train_mlp", True)),
            "train_unembed": bool(lora.get("train_unembed", True)),
        })  # fmt: skip

    def _new_model(self, s: Session, n: int, base: str, requested: str, kind: str,
                   payload: Any) -> tuple[str, str]:  # fmt: skip
        mid = wire.model_id(s.id, n)
        with self.lock:
            known = self.seen.get((mid, 0))
            if known is not None:  # a retried submission
                return known, mid
            if mid in self.models:
                raise UserError(f"model {mid} exists")
            self._check_quota(s.namespace)
            m = Model(mid, s.id, s.namespace, base, requested, rank=int(payload.get("rank", 8)))
            f = self._future()
            m.pending[0] = Request(kind, payload, f)
            self.models[mid] = m
            self.seen[(mid, 0)] = f.id
            s.models.append(mid)
            self._ensure_worker()
            self.lock.notify_all()
        return f.id, mid

    def load_weights(self, namespace: str, body: dict[str, Any]) -> tuple[str, str]:
        """A new training client from a saved state (``session_id`` form), or a state loaded
        into an existing one (``model_id`` + ``seq_id``)."""
        path = self._state_path(body.get("path"), namespace)
        optimizer = bool(body.get("optimizer", False))
        if body.get("session_id") is not None:
            s = self.session(body.get("session_id"), namespace)
            n = body.get("model_seq_id")
            if not isinstance(n, int) or n < 0:
                raise UserError("model_seq_id: a non-negative integer")
            source = self.models.get(path.model_id)
            base = source.base if source else self._saved_base(path, namespace)
            requested = source.requested if source else base
            return self._new_model(s, n, base, requested, "load",
                                   {"path": path, "optimizer": optimizer})  # fmt: skip
        rid = self.ordered(namespace, body.get("model_id"), body.get("seq_id"), "load_into",
                           {"path": path, "optimizer": optimizer})  # fmt: skip
        return rid, str(body.get("model_id"))

    def _state_path(self, value: Any, namespace: str) -> wire.TinkerPath:
        try:
            path = wire.parse_path(value)
        except wire.WireError as exc:
            raise UserError(str(exc)) from None
        if path.kind != "weights":
            raise UserError("path: a training state (tinker://…/weights/NAME) is loaded; "
                            "sampler weights are sampled")  # fmt: skip
        sid, _ = wire.parse_model_id(path.model_id)
        source = self.sessions.get(sid)
        if source is not None and source.namespace != namespace:
            raise UserError(f"checkpoint {value} not found", 404)
        return path

    def _saved_base(self, path: wire.TinkerPath, namespace: str) -> str:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                d = fetch_staged(self.store, self._prefix(namespace, path), Path(tmp))
                import json

                return str(json.loads((d / "session.json").read_text())["base"])
        except ObjectNotFound:
            raise UserError(f"checkpoint {path} not found", 404) from None

    def ordered(self, namespace: str, model_id: Any, seq_id: Any, kind: str,
                payload: Any) -> str:  # fmt: skip
        """Accept a request that runs in its model's ``seq_id`` order; returns its request id."""
        m = self.model(model_id, namespace)
        if not isinstance(seq_id, int) or seq_id < 1:
            raise UserError("seq_id: a positive integer")
        host = self.hosts.get(m.base)
        if kind == "forward_backward" and host is not None:  # bad input: a 4xx now
            from workers.training.sessions import check_datums

            try:
                check_datums(payload.datums, payload.loss_fn, host.vocab)
            except TrainingError as exc:
                with self.lock:  # its seq_id is spent: the model's later requests go on
                    if seq_id >= m.next_seq and seq_id not in m.pending:
                        f = self._future()
                        f.finish(error=str(exc), category="user")
                        m.pending[seq_id] = Request("rejected", None, f)
                        self.lock.notify_all()
                raise UserError(str(exc)) from None
        with self.lock:
            known = self.seen.get((m.id, seq_id))
            if known is not None:
                return known
            if m.ended:
                raise UserError(f"model {m.id}: {m.ended}")
            if seq_id < m.next_seq:
                raise UserError(f"seq_id {seq_id} of model {m.id} was already used")
            f = self._future()
            m.pending[seq_id] = Request(kind, payload, f)
            self.seen[(m.id, seq_id)] = f.id
            self.lock.notify_all()
        return f.id

    def save_weights_for_sampler(self, namespace: str, body: dict[str, Any]) -> str:
        name = body.get("path")
        seq = body.get("sampling_session_seq_id")
        if name is None and seq is None:
            raise UserError("path or sampling_session_seq_id is required")
        if name is not None:
            try:
                wire.checkpoint_name(name)
            except wire.WireError as exc:
                raise UserError(str(exc)) from None
        return self.ordered(namespace, body.get("model_id"), body.get("seq_id"), "sampler_save",
                            {"name": name, "sampling_seq": seq})  # fmt: skip

    def create_sampling_session(self, namespace: str, body: dict[str, Any]) -> str:
        s = self.session(body.get("session_id"), namespace)
        path_value = body.get("model_path")
        if path_value:
            try:
                path = wire.parse_path(path_value)
            except wire.WireError as exc:
                raise UserError(str(exc)) from None
            snapshot = self.sampler_paths.get(str(path))
            source = self.models.get(path.model_id)
            if snapshot is None or source is None or source.namespace != namespace:
                raise UserError(f"sampler weights {path_value} not found", 404)
            return self._add_sampler(s, source.base, source.requested, snapshot, str(path))
        base = self.resolve_base(body.get("base_model"))
        return self._add_sampler(s, base, str(body.get("base_model")), None, None)

    def _add_sampler(self, s: Session, base: str, requested: str, snapshot: str | None,
                     path: str | None) -> str:  # fmt: skip
        sid = f"smp-{uuid.uuid4().hex}"
        with self.lock:
            self.samplers[sid] = Sampler(sid, s.namespace, base, requested, snapshot, path)
        return sid

    def sample(self, namespace: str, body: dict[str, Any]) -> tuple[str, list[str]]:
        """Accept a sampling request; returns its request id and one sequence id per sample."""
        sampler_id = body.get("sampling_session_id")
        if sampler_id is None:
            raise UserError("sampling_session_id is required (create a sampling client)")
        smp = self.sampler(sampler_id, namespace)
        try:
            tokens = wire.prompt_tokens(body.get("prompt"))
        except wire.WireError as exc:
            raise UserError(str(exc)) from None
        n = body.get("num_samples", 1)
        if not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
            raise UserError(f"num_samples: an integer from 1 to {MAX_SAMPLES}")
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise UserError("sampling_params: an object")
        rows_spec = _sampling(params, n)
        seq_id = body.get("seq_id")
        with self.lock:
            key = (smp.id, seq_id) if isinstance(seq_id, int) else None
            if key is not None and key in self.seen:
                rid = self.seen[key]
                return rid, [f"{rid}:{i}" for i in range(n)]
            f = self._future()
            if key is not None:
                self.seen[key] = f.id
            topk_prompt = int(body.get("topk_prompt_logprobs") or 0)
            self.samples.append(Request("sample", {
                "sampler": smp, "tokens": tokens, "rows": rows_spec,
                "prompt_logprobs": bool(body.get("prompt_logprobs")) or topk_prompt > 0,
                "topk_prompt": topk_prompt,
                "topk_sample": int(body.get("topk_sample_logprobs") or 0),
            }, f))  # fmt: skip
            self._ensure_worker()
            self.lock.notify_all()
        return f.id, [f"{f.id}:{i}" for i in range(n)]

    def _submit_control(self, req: Request) -> str:
        with self.lock:
            self.samples.appendleft(req)  # control requests jump the sampling queue
            self._ensure_worker()
            self.lock.notify_all()
        return req.future.id

    def future(self, request_id: Any) -> Future:
        f = self.futures.get(request_id) if isinstance(request_id, str) else None
        if f is None:
            raise UserError(f"request {str(request_id)[:80]!r} not found", 404)
        return f

    # -- the worker ----------------------------------------------------------------------------
    def _ready(self) -> tuple[list[tuple[Model, Request]], list[Request]]:
        now = time.monotonic()
        for m in self.models.values():  # a seq_id that never came must not stall the model
            if m.pending and m.next_seq not in m.pending:
                m.gap_since = m.gap_since or now
                if now - m.gap_since > SEQ_GAP_S:
                    log.warning("model %s: seq_id %d never arrived; going on", m.id, m.next_seq)
                    m.next_seq = min(m.pending)
            else:
                m.gap_since = None
        ordered = [(m, m.pending.pop(m.next_seq)) for m in self.models.values()
                   if m.next_seq in m.pending]  # fmt: skip
        others = list(self.samples)
        self.samples.clear()
        return ordered, others

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop:
                    ordered, others = self._ready()
                    if ordered or others:
                        break
                    self.lock.wait(timeout=REAP_EVERY_S)
                    self._reap_due()
                else:
                    return
            try:
                self._execute(ordered, others)
            except Exception:  # a bug must not stop every session: fail what was in hand
                log.exception("tinker worker: a batch failed")
                for _, r in ordered:
                    if not r.future.done.is_set():
                        r.future.finish(error="internal error", category="server")
                for r in others:
                    if not r.future.done.is_set():
                        r.future.finish(error="internal error", category="server")
            finally:
                with self.lock:
                    for m, _ in ordered:
                        m.next_seq += 1
                        m.last_used = time.monotonic()
                    self._reap_due()  # a busy worker keeps house too

    def _reap_due(self) -> None:
        """Housekeeping between requests (on the worker thread): silent sessions end, models
        whose job was cancelled stop, idle models leave the accelerator, old answers go."""
        now = time.monotonic()
        if now - self._last_flush > FLUSH_EVERY_S:
            self._flush()
        if now - self._last_reap < REAP_EVERY_S:
            return
        self._last_reap = now
        for s in list(self.sessions.values()):
            if not s.ended and not s.ending and now - s.heartbeat > self.heartbeat_s:
                log.info("tinker session %s: no heartbeat for %.0f s; ending it", s.id,
                         now - s.heartbeat)  # fmt: skip
                s.ending = True
                self.samples.appendleft(Request("end_session", (s.id, "cancelled",
                    "no heartbeat: session timed out (state saved)"), self._future()))  # fmt: skip
        for m in list(self.models.values()):
            if m.ended or m.job_id is None:
                continue
            if now - m.checked > JOB_CHECK_S:
                m.checked = now
                try:
                    state = jobs.get_job(self.catalog, job_id=m.job_id).state
                except StorageError:
                    state = "running"  # the catalog is away: judge again later
                if state == "cancelled":
                    m.ended = "its job was cancelled"
                    self._host(m.base).drop(m.id)
                    continue
            if now - m.last_used > PARK_AFTER_S:
                self._host(m.base).park(m.id)
        old = [k for k, f in self.futures.items()
               if f.done.is_set() and now - f.finished_at > FUTURE_TTL_S]  # fmt: skip
        for k in old:
            del self.futures[k]

    def _execute(self, ordered: list[tuple[Model, Request]], others: list[Request]) -> None:
        fb = [(m, r) for m, r in ordered if r.kind == "forward_backward"]
        for m, r in ordered:
            if r.kind != "forward_backward":
                self._guarded(r, lambda m=m, r=r: self._one(m, r))
        if fb:
            self._forward_backward(fb)
        for r in others:
            if r.kind == "end_session":
                self._guarded(r, lambda r=r: self._end_session(*r.payload))
        samples = [r for r in others if r.kind == "sample"]
        if samples:
            self._sample(samples)

    def _guarded(self, r: Request, fn: Any) -> None:
        try:
            out = fn()
            if not r.future.done.is_set():
                r.future.finish(json=out if isinstance(out, dict) else {})
        except (TrainingError, UserError, wire.WireError) as exc:
            r.future.finish(error=str(exc), category="user")
        except Exception:
            log.exception("tinker request %s failed", r.future.id)
            r.future.finish(error="the server failed this request; see its log", category="server")

    # -- what each request does ---------------------------------------------------------------
    def _host(self, base: str) -> Any:
        host = self.hosts.get(base)
        if host is None:
            from workers.base_model import load_base
            from workers.training.sessions import SessionHost

            model, tokenizer = load_base(self.registry.base_dir(base), device=self.device)
            host = self.hosts[base] = SessionHost(model, tokenizer, device=self.device)
        return host

    def _one(self, m: Model, r: Request) -> dict[str, Any]:
        if r.kind == "rejected":  # answered when it was refused
            return {}
        if m.ended and r.kind not in ("create", "load"):
            raise UserError(f"model {m.id}: {m.ended}")
        if r.kind in ("create", "load"):
            return self._create(m, r)
        if r.kind == "optim_step":
            return self._optim_step(m, r.payload)
        if r.kind == "save_state":
            return {"path": self._save_state(m, r.payload["name"]), "type": "save_weights"}
        if r.kind == "sampler_save":
            return self._sampler_save(m, r.payload)
        if r.kind == "load_into":
            self._load_state(m, r.payload["path"], optimizer=r.payload["optimizer"])
            return {"model_id": m.id, "path": str(r.payload["path"]), "type": "load_weights"}
        raise UserError(f"unknown request {r.kind}")

    def _create(self, m: Model, r: Request) -> dict[str, Any]:
        from workers.training.sessions import session_lora

        host = self._host(m.base)
        if r.kind == "create":
            p = r.payload
            lora = session_lora(p["rank"], train_attn=p["train_attn"], train_mlp=p["train_mlp"])
            host.create(m.id, lora, seed=p["seed"])
        else:
            path: wire.TinkerPath = r.payload["path"]
            with tempfile.TemporaryDirectory() as tmp:
                d = self._fetch_state(m.namespace, path, Path(tmp))
                info = _read_json(d / "session.json")
                lora = session_lora(int(info["rank"]), train_attn=bool(info["train_attn"]),
                                    train_mlp=bool(info["train_mlp"]))  # fmt: skip
                m.rank = int(info["rank"])
                host.create(m.id, lora, seed=0)
                host.load_state(m.id, d, optimizer=r.payload["optimizer"])
                m.step = host.member(m.id).step
        self._start_job(m, r)
        return {"model_id": m.id, "type": "create_model" if r.kind == "create" else "load_weights"}

    def _start_job(self, m: Model, r: Request) -> None:
        member = self._host(m.base).member(m.id)
        assert member.lora is not None
        name = f"tinker-{m.session_id[:12]}-{m.id.rsplit(':', 1)[1]}"
        spec: dict[str, Any] = {
            "kind": "tinker", "namespace": m.namespace, "name": name, "base_model": m.base,
            "method": {"type": "tinker"},
            "tinker": {"session_id": m.session_id, "model_id": m.id, "base_model": m.requested,
                       "loaded_from": str(r.payload["path"]) if r.kind == "load" else None},
            "lora": {"r": member.lora.r, "alpha": member.lora.alpha,
                     "target_modules": list(member.lora.target_modules)},
        }  # fmt: skip
        job, _ = jobs.create_job(self.catalog, namespace=m.namespace, name=name, spec=spec)
        m.job_id = job.id
        jobs.transition_job(self.catalog, job_id=job.id, allowed_from={"queued"}, to="starting",
                            count_attempt=True)  # fmt: skip
        jobs.transition_job(self.catalog, job_id=job.id, allowed_from={"starting"}, to="running")

    def _forward_backward(self, batch: list[tuple[Model, Request]]) -> None:
        from workers.training.sessions import LossCall, check_datums

        by_base: dict[str, list[tuple[Model, Request, Any]]] = {}
        for m, r in batch:
            fb: wire.ForwardBackward = r.payload
            try:
                if m.ended:
                    raise UserError(f"model {m.id}: {m.ended}")
                host = self._host(m.base)
                check_datums(fb.datums, fb.loss_fn, host.vocab)
                low = fb.config.get("clip_low_threshold", 0.8)
                high = fb.config.get("clip_high_threshold", 1.2)
                call = LossCall(m.id, fb.datums, fb.loss_fn, low, high, fb.forward_only)
            except (TrainingError, UserError) as exc:  # this request alone fails
                r.future.finish(error=str(exc), category="user")
                continue
            by_base.setdefault(m.base, []).append((m, r, call))
        for base, group in by_base.items():
            t0 = time.perf_counter()
            try:
                results = self._host(base).forward_backward([c for _, _, c in group])
            except Exception:
                log.exception("tinker forward_backward failed")
                for _, r, _ in group:
                    r.future.finish(error="the server failed this request; see its log",
                                    category="server")  # fmt: skip
                continue
            elapsed = time.perf_counter() - t0
            usage = []
            for m, r, c in group:
                res = results[m.id]
                if not c.forward_only:
                    m.loss_sum += res.loss_sum
                    m.tokens += res.tokens
                    m.step_started = m.step_started or time.monotonic() - elapsed
                r.future.finish(
                    proto=wire.encode_forward_backward(res.logprobs, {"loss:sum": res.loss_sum}),
                    json={"loss_fn_output_type": "ArrayRecord",
                          "metrics": {"loss:sum": res.loss_sum},
                          "loss_fn_outputs": [{"logprobs": {"data": lp, "dtype": "float32",
                                                            "shape": [len(lp)]}}
                                              for lp in res.logprobs]},
                )  # fmt: skip
                usage.append((m, res.tokens, 0))
            self._meter(usage)

    def _optim_step(self, m: Model, body: dict[str, Any]) -> dict[str, Any]:
        from workers.training.sessions import Adam

        params = body.get("adam_params") or body.get("optim_params") or {}
        if not isinstance(params, dict) or params.get("type", "adam") not in ("adam", "adamw"):
            raise UserError("adam_params: this server steps with Adam(W) only")
        try:
            adam = Adam(**{k: float(v) for k, v in params.items() if k != "type"})
        except (TypeError, ValueError) as exc:
            raise UserError(f"adam_params: {exc}") from None
        if adam.learning_rate < 0 or not 0 <= adam.beta1 < 1 or not 0 <= adam.beta2 < 1:
            raise UserError("adam_params: learning_rate ≥ 0 and betas in [0, 1)")
        metrics = self._host(m.base).optim_step(m.id, adam)
        m.step += 1
        tokens = max(m.tokens, 1)
        took = time.monotonic() - m.step_started if m.step_started else 0.0
        event = {"step": m.step, "loss": m.loss_sum / tokens, "loss_sum": m.loss_sum,
                 "lr": adam.learning_rate, "tokens": m.tokens,
                 "tokens_per_s": m.tokens / took if took > 0 else 0.0}  # fmt: skip
        m.loss_sum, m.tokens, m.step_started = 0.0, 0, None
        if m.job_id is not None:  # written with the next flush: no catalog write per step
            self._events.append((m.job_id, "metrics", event))
        return {"metrics": metrics, "type": "optim_step"}

    def _prefix(self, namespace: str, path: wire.TinkerPath) -> str:
        sid, n = wire.parse_model_id(path.model_id)
        return f"tinker/{namespace}/{sid}/{n}/{path.kind}/{path.name}"

    def _save_state(self, m: Model, name: str) -> str:
        path = wire.TinkerPath(m.id, "weights", name)
        host = self._host(m.base)
        member = host.member(m.id)
        with tempfile.TemporaryDirectory() as tmp:
            host.save_state(m.id, Path(tmp))
            _write_json(Path(tmp) / "session.json", {
                "base": m.base, "requested": m.requested, "rank": member.lora.r,
                "train_attn": "q_proj" in member.lora.target_modules,
                "train_mlp": "up_proj" in member.lora.target_modules, "step": m.step,
            })  # fmt: skip
            stage_dir(self.store, Path(tmp), self._prefix(m.namespace, path))
        if m.job_id is not None:
            jobs.add_event(self.catalog, job_id=m.job_id, kind="checkpoint",
                           data={"step": m.step, "path": str(path)})  # fmt: skip
        return str(path)

    def _fetch_state(self, namespace: str, path: wire.TinkerPath, dest: Path) -> Path:
        try:
            return fetch_staged(self.store, self._prefix(namespace, path), dest)
        except ObjectNotFound:
            raise UserError(f"checkpoint {path} not found") from None

    def _load_state(self, m: Model, path: wire.TinkerPath, *, optimizer: bool) -> None:
        host = self._host(m.base)
        with tempfile.TemporaryDirectory() as tmp:
            d = self._fetch_state(m.namespace, path, Path(tmp))
            info = _read_json(d / "session.json")
            if int(info["rank"]) != host.member(m.id).lora.r or info["base"] != m.base:
                raise UserError(f"checkpoint {path} has rank {info['rank']} on {info['base']}; "
                                f"model {m.id} has another shape")  # fmt: skip
            host.load_state(m.id, d, optimizer=optimizer)
            m.step = host.member(m.id).step

    def _sampler_save(self, m: Model, p: dict[str, Any]) -> dict[str, Any]:
        host = self._host(m.base)
        name = p["name"] or f"sampler-{m.step:06d}-{uuid.uuid4().hex[:6]}"
        path = wire.TinkerPath(m.id, "sampler_weights", name)
        key = f"{m.id}/{name}/{uuid.uuid4().hex[:8]}"
        host.snapshot(m.id, key)
        self._evict_snapshots(host)
        version = self._publish(m, host, key, name)
        with self.lock:
            self.sampler_paths[str(path)] = key
        if m.job_id is not None:
            jobs.add_event(self.catalog, job_id=m.job_id, kind="log",
                           data={"message": f"sampler weights {path} published as "
                                            f"{version}"})  # fmt: skip
        if p["sampling_seq"] is not None:
            s = self.sessions[m.session_id]
            sid = self._add_sampler(s, m.base, m.requested, key, str(path))
            return {"sampling_session_id": sid, "type": "save_weights_for_sampler"}
        return {"path": str(path), "type": "save_weights_for_sampler"}

    def _publish(self, m: Model, host: Any, key: str, name: str) -> str:
        """The snapshot as an immutable catalog version (lineage: session, model, step)."""
        repo_name = f"tinker-{m.session_id[:12]}-{m.id.rsplit(':', 1)[1]}"
        with tempfile.TemporaryDirectory() as tmp:
            host.export(key, Path(tmp), base_name=m.base)
            v = self.registry.publish(
                adapter_dir=tmp, ref=f"{m.namespace}/{repo_name}", base_model=m.base,
                job_id=m.job_id, metrics={"step": m.step},
                hyperparameters={"tinker": {"session_id": m.session_id, "model_id": m.id,
                                            "step": m.step, "name": name}},
                created_by="tinker",
            )  # fmt: skip
        return f"{m.namespace}/{repo_name}:{v.version}"

    def _evict_snapshots(self, host: Any) -> None:
        live = {s.snapshot for s in self.samplers.values()}
        snaps = sorted(host.snapshots.values(), key=lambda s: s.last_used)
        for s in snaps[: max(0, len(snaps) - SAMPLERS_KEPT)]:
            if s.key not in live:
                host.drop_snapshot(s.key)

    def _sample(self, requests: list[Request]) -> None:
        from workers.serving.decode import choice_seed

        groups: dict[tuple[str, str | None], list[Request]] = {}
        for r in requests:
            smp: Sampler = r.payload["sampler"]
            groups.setdefault((smp.base, smp.snapshot), []).append(r)
        for (base, snapshot), group in groups.items():
            rows, owners = [], []
            for r in group:
                p = r.payload
                for i, spec in enumerate(p["rows"]):
                    seed = choice_seed(spec.pop("seed_base", None), 0, i)
                    rows.append(_decode_row(p, spec, seed))
                    owners.append(r)
            try:
                host = self._host(base)
                vocab = host.vocab
                for r in group:
                    bad = next((t for t in r.payload["tokens"] if not 0 <= t < vocab), None)
                    if bad is not None:
                        raise UserError(f"prompt token id {bad} is outside the vocabulary "
                                        f"(0..{vocab - 1})")  # fmt: skip
                outs = host.sample(snapshot, rows)
            except (UserError, TrainingError, ValueError) as exc:
                for r in group:
                    r.future.finish(error=str(exc), category="user")
                continue
            except Exception:
                log.exception("tinker sampling failed")
                for r in group:
                    r.future.finish(error="the server failed this request; see its log",
                                    category="server")  # fmt: skip
                continue
            k = 0
            usage = []
            for r in group:
                n = len(r.payload["rows"])
                mine, k = outs[k : k + n], k + n
                self._answer_sample(r, mine)
                usage.append((r.payload["sampler"], len(r.payload["tokens"]) * n,
                              sum(len(o.token_ids) for o in mine)))  # fmt: skip
            self._meter(usage)

    def _answer_sample(self, r: Request, outs: list[Any]) -> None:
        p = r.payload
        seqs = []
        for o in outs:
            if o.error:
                r.future.finish(error=o.error, category="user")
                return
            tokens = list(o.token_ids) + ([o.stop_token] if o.stop_token is not None else [])
            lps = [x.logprob for x in o.logprobs][: len(tokens)]
            top = [list(x.top) for x in o.logprobs][: len(tokens)] if p["topk_sample"] else None
            seqs.append(wire.SampledSequence(tokens, lps, o.finish_reason == "stop", top))
        prompt = None
        prompt_top = None
        if p["prompt_logprobs"]:
            first = outs[0].prompt_logprobs
            prompt = [None if x is None else x.logprob for x in first]
            if p["topk_prompt"]:
                prompt_top = [[] if x is None else list(x.top) for x in first]
        r.future.finish(proto=wire.encode_sample(seqs, prompt, prompt_top), json={
            "sequences": [{"tokens": s.tokens, "logprobs": s.logprobs,
                           "stop_reason": "stop" if s.stopped else "length"} for s in seqs],
            "prompt_logprobs": prompt, "type": "sample",
        })  # fmt: skip

    def _meter(self, usage: list[tuple[Any, int, int]]) -> None:
        """Count requests and tokens per (namespace, base) in memory; ``_flush`` writes them."""
        for who, prompt, completion in usage:
            c = self._usage.setdefault((who.namespace, f"tinker:{who.base}"), [0, 0, 0])
            c[0] += 1
            c[1] += prompt
            c[2] += completion

    def _flush(self) -> None:
        """Write the counted usage and the steps' events to the catalog, one transaction
        each (metering and events never fail a request: a failed write is retried later)."""
        from datetime import UTC, datetime

        from storage.catalog.usage import minute_of

        self._last_flush = time.monotonic()
        if self._usage:
            minute = minute_of(datetime.now(UTC))
            counts = [UsageCount(minute, ns, model, *c) for (ns, model), c in self._usage.items()]
            try:
                add_usage(self.catalog, counts)
                self._usage.clear()
            except StorageError as exc:
                log.warning("tinker metering failed (kept for the next flush): %s", exc)
        if self._events:
            events, self._events = self._events, []
            try:
                jobs.add_events(self.catalog, events)
            except StorageError as exc:
                self._events = events + self._events
                log.warning("tinker job events failed (kept for the next flush): %s", exc)

    def _end_session(self, session_id: str, state: str, reason: str | None) -> dict[str, Any]:
        s = self.sessions.get(session_id)
        if s is None or s.ended:
            return {}
        s.ended = True
        self._flush()  # its last steps' events are in before its job ends
        for mid in s.models:
            m = self.models.get(mid)
            if m is None or m.ended or m.job_id is None:
                continue
            try:
                self._save_state(m, "final")
            except Exception:
                log.exception("saving model %s at session end failed", mid)
            m.ended = reason or "its session finished"
            self._host(m.base).drop(m.id)
            with contextlib.suppress(jobs.JobStateConflict):  # cancelled meanwhile
                jobs.transition_job(self.catalog, job_id=m.job_id, allowed_from={"running"},
                                    to=state, status_reason=reason)  # fmt: skip
        with self.lock:  # its requests' idempotency keys go with it
            for key in [k for k in self.seen if k[0] in s.models]:
                del self.seen[key]
        return {}


def _sampling(params: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per sample, its decode settings from Tinker's ``sampling_params``.

    Raises:
        UserError: a value out of range, naming it.
    """
    max_tokens = params.get("max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"sampling_params.max_tokens: an integer from 1 to {MAX_NEW_TOKENS}")
    temperature = params.get("temperature", 1.0)
    top_p = params.get("top_p", 1.0)
    top_k = params.get("top_k", -1)
    if not isinstance(temperature, int | float) or temperature < 0:
        raise UserError("sampling_params.temperature: a number ≥ 0")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise UserError("sampling_params.top_p: in (0, 1]")
    if not isinstance(top_k, int):
        raise UserError("sampling_params.top_k: an integer (-1: all)")
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 64:
        raise UserError("sampling_params.stop: a string, or a list of strings or token ids")
    texts = tuple(s for s in stop if isinstance(s, str))
    ids = tuple(s for s in stop if isinstance(s, int) and not isinstance(s, bool))
    if len(texts) + len(ids) != len(stop):
        raise UserError("sampling_params.stop: strings or token ids")
    seed = params.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise UserError("sampling_params.seed: an integer")
    return [{"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
             "top_k": max(top_k, 0), "stop": texts, "stop_ids": ids, "seed_base": seed}
            for _ in range(n)]  # fmt: skip


def _decode_row(p: dict[str, Any], spec: dict[str, Any], seed: int | None) -> Any:
    from workers.serving.decode import DecodeRow

    return DecodeRow(
        prompt_ids=p["tokens"], max_new_tokens=spec["max_tokens"],
        temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"], seed=seed,
        stop=spec["stop"], stop_token_ids=spec["stop_ids"], logprobs=p["topk_sample"],
        prompt_logprobs=p["topk_prompt"] if p["prompt_logprobs"] else None, deltas=False,
    )  # fmt: skip


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(path.read_text()))
