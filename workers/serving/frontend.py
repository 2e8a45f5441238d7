"""The OpenAI-compatible ingress's logic, without Ray and without a web framework.

``Frontend`` answers the questions of one request in order — who is asking (bearer token),
which exact adapter version ``model`` means, what the replica must decode (token ids, ``n``,
log-probabilities, the tenant it counts against) — and turns the replica's results into
OpenAI's shapes, streamed or not, each carrying the digests of the bytes that answered
(``provenance.py``). ``ingress.py`` is the thin Ray Serve shell around it.

Errors are ``RequestFailed(kind, message, param)``; ``STATUS_OF_KIND`` (the one place a kind
becomes an HTTP status) and ``public_message`` (5xx bodies are generic, with a request id that
links to the log line holding the detail) are the HTTP layer's rules, kept here with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from storage.auth import Principal, Unauthorized, authenticate
from storage.catalog.domain import AdapterVersion
from storage.errors import InvalidName, NotFound, StorageError
from storage.fingerprint import fingerprint_model_dir
from storage.names import parse_ref
from storage.registry import Registry
from storage.settings import settings_on_node
from workers.base_model import load_base_config, load_tokenizer
from workers.serving.logprobs import TokenLogprob
from workers.serving.metering import UsageMeter
from workers.serving.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamFormatter,
    chat_choice,
    chat_logprobs,
    chat_prompt_ids,
    completion_choice,
    completion_logprobs,
    error_body,
    response,
    tool_answer,
    usage,
)
from workers.serving.options import ServeOptions
from workers.serving.provenance import Provenance, adapter_sha256, base_sha256
from workers.serving.resolver import RefResolver
from workers.serving.token_text import TokenText
from workers.tool_calls import ToolCallStream, ToolPlan, finish_reason

log = logging.getLogger(__name__)

# The one place a kind of failure becomes an HTTP status.
STATUS_OF_KIND = {"not_found": 404, "invalid": 400, "mismatch": 422, "busy": 503,
                  "overloaded": 429, "corrupt": 502, "internal": 500, "unauthorized": 401,
                  "forbidden": 403, "unavailable": 503}  # fmt: skip
GENERIC_5XX = {
    500: "the server failed on this request",
    502: "the adapter's stored bytes could not be read or verified",
    503: "the server cannot take this request now; retry shortly",
}
AUTH_TTL_S = 1.0  # how long a token's check is trusted (a revoked token stops within it)
QUICK_CHARS = 2_000  # prompts this short are tokenized on the event loop


def status_of(kind: str | None) -> int:
    """The HTTP status of an error kind (unknown kinds are server errors)."""
    return STATUS_OF_KIND.get(kind or "internal", 500)


def public_message(status: int, message: str, request_id: str | None) -> str:
    """What a client reads: the message itself for a 4xx; for a 5xx a generic sentence and
    the request id, the detail (paths, URIs, hosts) going to the log line with that id."""
    if status < 500:
        return message
    log.error("request %s failed with %d: %s", request_id, status, message)
    generic = GENERIC_5XX.get(status, GENERIC_5XX[500])
    return f"{generic} (request id {request_id})" if request_id else generic


class RequestFailed(Exception):
    """A request this server answers with an error (``kind``: see ``STATUS_OF_KIND``)."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param

    @property
    def status(self) -> int:
        return status_of(self.kind)


def engine_failure(kind: str | None, message: str) -> RequestFailed:
    """A replica's refusal as a request error; ``param`` names the request field it is about:
    a grammar error names its part (``schema: …`` is the ``response_format``, ``tools[i]…``
    the tool), anything else is about the ``model`` that answered."""
    head = message.partition(": ")[0]
    param = ("response_format" if head == "schema"
             else head if head.startswith("tools") and " " not in head else "model")  # fmt: skip
    return RequestFailed(kind or "internal", message, param)


@dataclass(frozen=True)
class Prepared:
    """One request, ready for a replica: what to decode and how to answer."""

    chat: bool
    version: AdapterVersion | None  # None: the bare base
    model: str  # the name the response carries (the exact version, or the base)
    tenant: str  # the namespace it counts against
    prompts: list[list[int]]
    texts: list[str]  # each prompt as text (what ``echo`` returns)
    n: int
    logprobs: int | None  # top tokens per position (None: no log-probabilities)
    echo: bool
    stream: bool
    include_usage: bool
    provenance: Provenance
    payload: dict[str, Any]  # for the replica's ``generate``
    tools: ToolPlan | None = None  # chat tools: answers are parsed for calls when it says so

    @property
    def adapter(self) -> str | None:
        return self.version.ref if self.version is not None else None


class Frontend:
    """Everything the ingress does per request but the transport."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.settings = settings_on_node(opts.settings_json)
        self.registry = Registry.from_settings(self.settings)
        base = self.registry.base(opts.base_name)
        base_dir = self.registry.base_dir(opts.base_name)
        token = self.settings.api_token
        self.admin = token.get_secret_value() if token else None
        self.resolve = RefResolver(self.registry.resolve, ttl_s=opts.alias_ttl_s)
        self.tokenizer = load_tokenizer(base_dir)
        self.text = TokenText(self.tokenizer)
        self.eos = self.tokenizer.eos_token_id
        self.fingerprint = fingerprint_model_dir(base_dir).sha256
        self.base_sha = base_sha256(base.files)
        config = load_base_config(base_dir)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab = int(getattr(config, "vocab_size", 0) or len(self.tokenizer))
        self.meter = UsageMeter()
        self._auth: dict[str, tuple[float, Principal]] = {}
        self._auth_lock = threading.Lock()

    # -- who and what ----------------------------------------------------------------------
    def who_cached(self, authorization: str | None) -> Principal | None:
        """The caller, if checked within ``AUTH_TTL_S`` (no catalog access)."""
        hit = self._auth.get(authorization or "")
        if hit is not None and time.monotonic() - hit[0] < AUTH_TTL_S:
            return hit[1]
        return None

    def prepares_quickly(self, body: CompletionRequest | ChatCompletionRequest) -> bool:
        """Whether ``prepare`` needs neither the catalog nor much tokenizing (the ingress then
        runs it on its event loop rather than in a thread)."""
        if body.model != self.opts.base_name and self.resolve.fresh(body.model) is None:
            return False
        if self.opts.merged is not None and self.resolve.fresh(self.opts.merged) is None:
            return False
        if isinstance(body, ChatCompletionRequest):
            return sum(m.chars() for m in body.messages) <= QUICK_CHARS
        return sum(len(p) for p in body.prompts()) <= QUICK_CHARS

    def who(self, authorization: str | None) -> Principal:
        """The caller (checked against the catalog at most every ``AUTH_TTL_S``)."""
        key = authorization or ""
        now = time.monotonic()
        with self._auth_lock:
            hit = self._auth.get(key)
        if hit is not None and now - hit[0] < AUTH_TTL_S:
            return hit[1]
        try:
            who = authenticate(self.registry.catalog, self.admin, authorization)
        except Unauthorized as exc:
            raise RequestFailed("unauthorized", str(exc)) from None
        except StorageError as exc:
            raise RequestFailed("unavailable", f"the catalog is unavailable: {exc}") from None
        with self._auth_lock:
            if len(self._auth) > 10_000:
                self._auth.clear()
            self._auth[key] = (now, who)
        return who

    def target(self, model: str, who: Principal) -> AdapterVersion | None:
        """The exact adapter version ``model`` names (None: the bare base)."""
        if model == self.opts.base_name:
            return None
        try:
            ref = parse_ref(model)
        except InvalidName as exc:
            raise RequestFailed(
                "not_found", f"model {model!r} is neither the served base "
                f"({self.opts.base_name}) nor an adapter reference: {exc}", "model",
            ) from None  # fmt: skip
        if not who.can_see(ref.namespace):
            raise RequestFailed("not_found", f"adapter {model} not found", "model")
        try:
            return self.resolve(model)
        except NotFound as exc:
            raise RequestFailed("not_found", str(exc), "model") from None
        except StorageError as exc:
            raise RequestFailed("unavailable", f"the catalog is unavailable: {exc}") from None

    def provenance(self, version: AdapterVersion | None) -> Provenance:
        return Provenance(self.base_sha, adapter_sha256(version) if version else None)

    def prepare(
        self, body: CompletionRequest | ChatCompletionRequest, who: Principal, *, chat: bool
    ) -> Prepared:
        """Resolve, tokenize and check ``body`` (the catalog and the tokenizer: call it off the
        event loop)."""
        version = self.target(body.model, who)
        if self.opts.merged is not None:
            merged = self.resolve(self.opts.merged)
            if version is None or version.ref != merged.ref:
                raise RequestFailed("invalid", f"this deployment serves only {merged.ref} "
                                    f"(merged); asked for {body.model}", "model")  # fmt: skip
        plan = None
        if chat:
            assert isinstance(body, ChatCompletionRequest)
            plan = body.tool_plan()
            prompts = [chat_prompt_ids(self.tokenizer, body.messages, plan)]
            texts = [""]
            top, echo = body.top_logprobs_n(), False
        else:
            assert isinstance(body, CompletionRequest)
            prompts, texts = [], []
            for p in body.prompts():
                if isinstance(p, str):
                    prompts.append(list(self.tokenizer(p)["input_ids"]))
                    texts.append(p)
                else:
                    if max(p) >= self.vocab:
                        why = f"token id {max(p)} is outside the vocabulary (0…{self.vocab - 1})"
                        raise RequestFailed("invalid", why, "prompt")
                    prompts.append(list(p))
                    texts.append(self.tokenizer.decode(p))
            top, echo = body.top_logprobs(), body.echo
        limit = body.limit()
        for ids in prompts:
            if not ids:
                raise RequestFailed("invalid", "a prompt has no tokens", "prompt")
            if len(ids) + limit > self.context:
                raise RequestFailed("invalid", f"the prompt ({len(ids):,} tokens) plus "
                                    f"max_tokens ({limit:,}) exceed the model's context "
                                    f"({self.context:,} tokens)", "max_tokens")  # fmt: skip
        tenant = who.namespace if who.namespace is not None else (
            version.namespace if version is not None else "")  # fmt: skip
        payload = {"prompts": prompts, "max_tokens": limit, "temperature": body.temperature,
                   "top_p": body.top_p, "seed": body.seed, "stop": list(body.stops()),
                   "n": body.n, "logprobs": top, "echo": echo, "namespace": tenant,
                   "schema": body.response_schema(),
                   "tools": plan if plan is not None and plan.parses else None,
                   "stream": body.stream}  # fmt: skip
        return Prepared(
            chat, version, version.ref if version else self.opts.base_name, tenant, prompts,
            texts, body.n, top, echo, body.stream,
            bool(body.stream_options and body.stream_options.include_usage),
            self.provenance(version), payload, plan,
        )  # fmt: skip

    # -- answers ---------------------------------------------------------------------------
    def _logprobs(self, p: Prepared, r: Any) -> dict[str, Any] | None:
        if p.logprobs is None or r.logprobs is None:
            return None
        if p.chat:
            return chat_logprobs(self._visible(r.logprobs), self.text)
        entries: list[TokenLogprob | None] = list(r.logprobs)
        tokens = [e.token for e in r.logprobs]
        if p.echo and r.prompt_logprobs is not None:
            entries = [*r.prompt_logprobs, *entries]
            tokens = [*p.prompts[r.index // p.n], *tokens]
        return completion_logprobs(entries, self.text, tokens=tokens)

    def _visible(self, entries: Sequence[TokenLogprob]) -> list[TokenLogprob]:
        """A chat message's tokens: the end-of-turn token that closed it is not content."""
        if entries and entries[-1].token == self.eos:
            return list(entries[:-1])
        return list(entries)

    def answer(self, p: Prepared, results: Sequence[Any]) -> dict[str, Any]:
        """The response body for every choice's result (raises the first error)."""
        failed = next((r for r in results if r.error), None)
        if failed is not None:
            raise engine_failure(failed.kind, str(failed.error))
        choices = []
        for r in sorted(results, key=lambda r: r.index):
            text = r.text or ""
            if p.chat:
                content, calls, reason = tool_answer(text, r.finish_reason, p.tools)
                choices.append(chat_choice(r.index, content, reason, self._logprobs(p, r),
                                           calls))  # fmt: skip
            else:
                if p.echo:
                    text = p.texts[r.index // p.n] + text
                choices.append(completion_choice(r.index, text, r.finish_reason,
                                                 self._logprobs(p, r)))  # fmt: skip
        prompt_tokens, completion_tokens = self.counts(p, results)
        return response(chat=p.chat, model=p.model, choices=choices, prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        fingerprint=p.provenance.fingerprint)  # fmt: skip

    @staticmethod
    def counts(p: Prepared, results: Sequence[Any]) -> tuple[int, int]:
        """(prompt tokens, completion tokens): each prompt once, every choice's tokens."""
        return sum(len(ids) for ids in p.prompts), sum(r.completion_tokens for r in results)

    async def events(self, p: Prepared, items: AsyncIterator[dict[str, Any]], who: Principal,
                     request_id: str | None = None) -> AsyncIterator[str]:  # fmt: skip
        """Server-sent events for a streamed answer from the replica's ``items``."""
        fmt = StreamFormatter(p.model, chat=p.chat, fingerprint=p.provenance.fingerprint)
        offsets: dict[int, int] = {}
        parsers: dict[int, ToolCallStream] = {}  # per choice, when answers carry tool calls

        def parser(choice: int) -> ToolCallStream | None:
            if p.tools is None or not p.tools.parses:
                return None
            if choice not in parsers:
                parsers[choice] = ToolCallStream(p.tools.names(), p.tools.parallel)
            return parsers[choice]

        async for item in items:
            if "error" in item:  # the replica went away mid-stream: end the stream, say why
                status = status_of(item.get("kind"))
                message = public_message(status, str(item["error"]), request_id)
                yield f"data: {json.dumps(error_body(message, status))}\n\n"
                return
            chunks = []  # one write per item, whatever it holds
            for choice, text, entries in item.get("deltas", ()):
                lp = None
                if p.logprobs is not None and entries:
                    if p.chat:  # the end-of-turn token is not content
                        lp = chat_logprobs([e for e in entries if e.token != self.eos],
                                           self.text)  # fmt: skip
                    else:
                        lp = completion_logprobs(entries, self.text,
                                                 start=offsets.get(choice, 0))  # fmt: skip
                        offsets[choice] = lp["text_offset"][-1] + len(
                            self.text.text_of(entries[-1].token)
                        )
                tp = parser(choice)
                if tp is None:
                    chunks.append(fmt.delta(text, choice, lp))
                else:
                    chunks += self._tool_chunks(fmt, choice, tp.feed(text), lp)
            if "results" in item:
                results = item["results"]
                failed = next((r for r in results if r.error), None)
                if failed is not None:  # the stream is open: end it, say why
                    status = status_of(failed.kind)
                    message = public_message(status, str(failed.error), request_id)
                    yield "".join(chunks) + f"data: {json.dumps(error_body(message, status))}\n\n"
                    return
                prompt_tokens, completion_tokens = self.counts(p, results)
                self.count(p, who, prompt_tokens, completion_tokens)
                reasons = {r.index: r.finish_reason for r in sorted(results, key=lambda r: r.index)}
                for choice, tp in sorted(parsers.items()):
                    chunks += self._tool_chunks(fmt, choice, tp.close(), None)
                    reasons[choice] = finish_reason(tp.calls, reasons.get(choice))
                counts = usage(prompt_tokens, completion_tokens) if p.include_usage else None
                yield "".join(chunks) + fmt.finish(None, counts, reasons=reasons)
                return
            if chunks:
                yield "".join(chunks)

    @staticmethod
    def _tool_chunks(fmt: StreamFormatter, choice: int, events: list[tuple[str, Any]],
                     lp: dict[str, Any] | None) -> list[str]:  # fmt: skip
        """Chunks for a choice's parsed events (content, a call's header, argument
        fragments); the delta's log-probabilities ride on its first chunk."""
        chunks = []
        for kind, value in events:
            if kind == "content":
                chunks.append(fmt.delta(value, choice, lp))
            elif kind == "call":
                chunks.append(fmt.tool_delta(choice, value[0], call=value[1]))
            else:
                chunks.append(fmt.tool_delta(choice, value[0], arguments=value[1]))
            if kind != "content" and lp is not None:
                chunks.append(fmt.delta("", choice, lp))
            lp = None
        if lp is not None:
            chunks.append(fmt.delta("", choice, lp))
        return chunks

    # -- metering and listing --------------------------------------------------------------
    def count(self, p: Prepared, who: Principal, prompt_tokens: int,
              completion_tokens: int) -> None:  # fmt: skip
        """Meter an answered request (the numbers its ``usage`` field carries)."""
        if p.version is not None:
            namespace, model = p.version.namespace, p.version.ref
        else:  # the bare base: the caller's namespace ("" for the admin token)
            namespace, model = who.namespace or "", self.opts.base_name
        self.meter.add(namespace=namespace, model=model, prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens)  # fmt: skip

    def models(self, who: Principal) -> dict[str, Any]:
        """``GET /v1/models``: the base and the adapters of it ``who`` may see."""
        now = int(time.time())
        data: list[dict[str, Any]] = []
        merged = self.resolve(self.opts.merged).ref if self.opts.merged is not None else None
        if merged is None:
            data.append({"id": self.opts.base_name, "object": "model", "created": now,
                         "owned_by": "lorafleet"})  # fmt: skip
        for v in self.registry.list(namespace=who.namespace):
            if v.base_model.fingerprint != self.fingerprint:
                continue
            if merged is not None and v.ref != merged:
                continue
            created = int(v.created_at.timestamp()) if v.created_at else now
            for name in (v.ref, *(f"{v.namespace}/{v.name}@{a}" for a in v.aliases)):
                data.append({"id": name, "object": "model", "created": created,
                             "owned_by": v.namespace, "root": v.ref,
                             "parent": self.opts.base_name})  # fmt: skip
        return {"object": "list", "data": data}
