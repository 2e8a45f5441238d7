"""The OpenAI wire format: request models, response and stream-chunk builders, chat prompts.

Pure functions and pydantic models, no HTTP and no Ray, so they are unit-tested directly.
Defaults follow OpenAI's (``max_tokens`` 16, ``temperature`` 1, ``n`` 1). Fields clients send
that do not change the answer (``user``, ``metadata``) are accepted and ignored; a field that
would change it and is not implemented (``best_of``, penalties, ``logit_bias``, ``suffix``,
the legacy ``functions``) is refused with a message naming it, never silently dropped.
``response_format`` (JSON object or schema) and, on chat, ``tools``/``tool_choice``/
``parallel_tool_calls`` are enforced by grammars (``grammar.py``, ``tool_calls.py``).

Shapes, as OpenAI and vLLM return them:
- ``/v1/completions``: a prompt is a string, a list of strings, a list of token ids or a list
  of token-id lists (up to ``MAX_PROMPTS``); choices are prompt-major (``index = prompt · n +
  j``). ``logprobs: k`` (0–20) gives ``{tokens, token_logprobs, top_logprobs, text_offset}``
  per choice, ``top_logprobs`` holding the ``k`` most likely tokens and the chosen one;
  ``echo`` puts the prompt before the text, with its tokens' log-probabilities (the first
  ``null``), and allows ``max_tokens: 0``.
- ``/v1/chat/completions``: ``logprobs: true`` with ``top_logprobs`` (0–20) gives
  ``{"content": [{token, logprob, bytes, top_logprobs}]}``.
- Every response names the exact adapter version in ``model`` and carries a
  ``system_fingerprint`` of the bytes that answered (``provenance.py``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers import tool_calls
from workers.datasets import DEFAULT_CHAT_TEMPLATE
from workers.serving.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from workers.serving.token_text import TokenText
from workers.tool_calls import ToolCall, ToolPlan

MAX_TOKENS_LIMIT = 4096
# Bounds on what one request may ask, so no request can stall or break its batch-mates. The
# token budget (prompt + max_tokens ≤ the model's context) is checked after tokenization.
MIN_TEMPERATURE = 0.01  # 0 is greedy; below this, softmax(logits / t) is not a distribution
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator accepts
MAX_PROMPT_CHARS = 200_000
MAX_PROMPTS = 64  # prompts in one completions request
MAX_N = 16  # choices per prompt
MAX_MESSAGES = 512
MAX_STOPS, MAX_STOP_CHARS = 4, 128
MAX_BODY_BYTES = 2 * 1024 * 1024

# Fields of OpenAI's (or vLLM's) requests that change the answer and that this server does not
# implement: refused when set to anything but their neutral values.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
    "min_tokens": (None, 0), "functions": (None, []), "function_call": (None, "none"),
    "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "prompt_logprobs": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "reasoning_effort": (None,),
    "verbosity": (None,), "web_search_options": (None,),
}  # fmt: skip


def response_schema(value: Any) -> dict[str, Any] | None:
    """``response_format`` as a JSON schema: None for ``text``, any object for
    ``json_object``, the given schema for ``json_schema``.

    Raises:
        ValueError: any other shape, naming the part.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("an object with a type: text, json_object or json_schema")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"type {str(kind)[:40]!r}: one of text, json_object, json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("json_schema: an object with name and schema")
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ValueError("json_schema.name: a name of 1 to 64 characters")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ValueError("json_schema.schema: a JSON schema object")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError("json_schema.strict: true or false")
    return schema


def error_param(loc: Sequence[Any], message: str) -> str | None:
    """The request field an error is about: its location, or for a rule across fields (a
    model-level check, no location) the ``field:`` its message starts with."""
    names = [str(p) for p in loc if p not in ("body", "query", "header")]
    if names:
        return ".".join(names)
    head, sep, _ = message.removeprefix("Value error, ").partition(": ")
    return head if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head) else None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with ``usage`` (and no choices), as OpenAI's


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    # accepted only at their neutral values (see NEUTRAL)
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    suffix: Any = None
    min_tokens: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None  # text, json_object or json_schema (checked below)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    prompt_logprobs: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator(*NEUTRAL, mode="before")
    @classmethod
    def _unimplemented(cls, v: Any, info: Any) -> Any:
        if not any(v == neutral for neutral in NEUTRAL[info.field_name]):
            raise ValueError("not supported by this server")
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        response_schema(v)  # raises, naming the part
        return v

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must conform to (None: free text)."""
        return response_schema(self.response_format)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


Prompt = str | list[int]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        prompts = _split_prompts(v)
        if not prompts:
            raise ValueError("no prompt: give a string, token ids, or a list of either")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request")
        chars = 0
        for p in prompts:
            if not p:
                raise ValueError("a prompt is empty")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError("token ids are never negative")
            chars += len(p)
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts have {chars:,} characters or tokens; the limit is "
                             f"{MAX_PROMPT_CHARS:,}")  # fmt: skip
        return v

    tools: Any = None  # chat only: refused here, not silently dropped
    tool_choice: Any = None

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _chat_only(cls, v: Any) -> Any:
        if v not in (None, [], "none"):
            raise ValueError("tools are answered on /v1/chat/completions only")
        return v

    @model_validator(mode="after")
    def _echo_rules(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo")
        if self.echo and self.stream:
            raise ValueError("echo: not supported with stream")
        return self

    def prompts(self) -> list[Prompt]:
        """The prompts, each a string or a list of token ids."""
        return _split_prompts(self.prompt)

    def limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def top_logprobs(self) -> int | None:
        return self.logprobs


def _split_prompts(v: Any) -> list[Prompt]:
    if isinstance(v, str):
        return [v]
    if not v:
        return []
    if all(isinstance(x, int) for x in v):
        return [list(v)]
    return [x if isinstance(x, str) else list(x) for x in v]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(default="{}", max_length=MAX_PROMPT_CHARS)


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation: ``content`` a string, text parts, or (an assistant's
    turn that calls tools) null; ``developer`` is the system role under its newer name."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=tool_calls.MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=128)
    # not rendered by this server, so refused unless empty (the client's own message objects
    # carry them as null)
    name: Any = None
    audio: Any = None
    refusal: Any = None
    function_call: Any = None

    @field_validator("name", "audio", "refusal", "function_call", mode="before")
    @classmethod
    def _unrendered(cls, v: Any) -> Any:
        if v not in (None, ""):
            raise ValueError("not supported by this server")
        return v

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message calls tools")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (null only for an assistant's tool calls)")
        return self

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def chars(self) -> int:
        calls = sum(len(c.function.arguments) for c in self.tool_calls or ())
        return len(self.text()) + calls


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None  # checked with tool_choice and parallel_tool_calls by ``tool_plan``
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator("messages")
    @classmethod
    def _last_not_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        # a field validator, so that an error names ``messages`` as its param
        if messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's")
        chars = sum(m.chars() for m in messages)
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(
                f"messages have {chars:,} characters; the limit is {MAX_PROMPT_CHARS:,}"
            )
        try:
            tool_calls.check_history([m.model_dump() for m in messages])
        except tool_calls.ToolError as exc:
            raise ValueError(str(exc).removeprefix("messages")) from None
        return messages

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        self.tool_plan()  # raises, naming the field
        return self

    def tool_plan(self) -> ToolPlan | None:
        """What ``tools``/``tool_choice``/``parallel_tool_calls`` ask (None: no tools)."""
        return tool_calls.plan(self.tools, self.tool_choice, self.parallel_tool_calls)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: Any) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    def top_logprobs_n(self) -> int | None:
        """How many top tokens each position reports (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


def chat_prompt_ids(
    tokenizer: Any, messages: list[ChatMessage], tools: ToolPlan | None = None
) -> list[int]:
    """Render a conversation up to the assistant's turn, as the trainer renders chat rows;
    with tools (not under ``tool_choice: "none"``) as ``tool_calls.render`` says."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    offered = tools.tools if tools is not None and tools.mode != "none" else ()
    native = tool_calls.renders_tools(template)
    rendered, specs = tool_calls.render([m.model_dump() for m in messages], offered,
                                        native=native)  # fmt: skip
    extra = {"tools": specs} if specs else {}
    return list(
        tokenizer.apply_chat_template(
            rendered,
            chat_template=template,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
            **extra,
        )
    )


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- log-probabilities on the wire ---------------------------------------------------------
def completion_logprobs(
    entries: Sequence[TokenLogprob | None], text: TokenText, *, start: int = 0,
    tokens: Sequence[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The completions form: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the most
    likely tokens and the chosen one), ``text_offset`` (from ``start``). A ``None`` entry (the
    first prompt token under ``echo``) has ``null`` log-probabilities; ``tokens`` names the
    token at each position (needed for ``None`` entries)."""
    ids = list(tokens) if tokens is not None else [e.token for e in entries if e is not None]
    out: dict[str, Any] = {"tokens": [text.text_of(t) for t in ids], "token_logprobs": [],
                           "top_logprobs": [], "text_offset": text.offsets(ids, start)}  # fmt: skip
    for e in entries:
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e.logprob)
        top = {text.text_of(t): lp for t, lp in e.top}
        top.setdefault(text.text_of(e.token), e.logprob)
        out["top_logprobs"].append(top)
    return out


def merge_completion_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two completions-form pieces, one after the other (echo: the prompt's, then the text's)."""
    return {k: list(a[k]) + list(b[k]) for k in a}


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """The chat form: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}``."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        t, raw = text.of(token)
        return {"token": t, "logprob": logprob, "bytes": list(raw)}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
               for e in entries]  # fmt: skip
    return {"content": content, "refusal": None}


# -- responses ------------------------------------------------------------------------------
def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str | None, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None,
                calls: Sequence[ToolCall] = ()) -> dict[str, Any]:  # fmt: skip
    """One chat choice; with ``calls``, the message carries ``tool_calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [c.wire() for c in calls]
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}  # fmt: skip


def tool_answer(
    text: str, finish_reason: str | None, plan: ToolPlan | None
) -> tuple[str | None, list[ToolCall], str | None]:
    """A chat answer's (content, tool calls, finish reason) under ``plan``: the reason is
    ``tool_calls`` when the model called and stopped by itself."""
    if plan is None or not plan.parses:
        return text, [], finish_reason
    content, calls = tool_calls.parse(text, plan)
    return content, calls, tool_calls.finish_reason(calls, finish_reason)


def response(
    *, chat: bool, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
    completion_tokens: int, fingerprint: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A ``text_completion`` or ``chat.completion`` object; ``model`` is the exact version."""
    kind, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    return {"id": new_id(kind), "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def completion_response(
    model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A one-choice ``text_completion`` object."""
    return response(chat=False, model=model, choices=[completion_choice(0, text, finish_reason)],
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)  # fmt: skip


def chat_response(
    model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A one-choice ``chat.completion`` object."""
    return response(chat=True, model=model, choices=[chat_choice(0, text, finish_reason)],
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)  # fmt: skip


class StreamFormatter:
    """Server-sent-event chunks for one streamed answer (completion or chat), any choices."""

    def __init__(self, model: str, *, chat: bool, fingerprint: str | None = None) -> None:
        self.model, self.chat, self.fingerprint = model, chat, fingerprint
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        self._started: set[int] = set()

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    def _choice(self, index: int, text: str | None, finish_reason: str | None,
                logprobs: dict[str, Any] | None,
                calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
        if self.chat:
            delta: dict[str, Any] = {}
            if index not in self._started:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}  # fmt: skip
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish_reason}  # fmt: skip
        self._started.add(index)
        return choice

    def delta(self, text: str, index: int = 0, logprobs: dict[str, Any] | None = None) -> str:
        return self._body([self._choice(index, text, None, logprobs)])

    def tool_delta(self, index: int, call_index: int, *, call: ToolCall | None = None,
                   arguments: str = "") -> str:  # fmt: skip
        """A tool call's chunk, as OpenAI streams one: first its id, type and name (with
        empty arguments), then fragments of its arguments."""
        item: dict[str, Any] = {"index": call_index}
        if call is not None:
            item.update(id=call.id, type="function",
                        function={"name": call.name, "arguments": arguments})  # fmt: skip
        else:
            item["function"] = {"arguments": arguments}
        return self._body([self._choice(index, None, None, None, [item])])

    def finish(self, finish_reason: str | None, usage_counts: dict[str, int] | None = None,
               *, reasons: dict[int, str | None] | None = None) -> str:  # fmt: skip
        """The last chunk of every choice (``reasons``: per choice; else choice 0 ends with
        ``finish_reason``); with ``usage_counts`` (``stream_options.include_usage``) one more
        chunk carrying ``usage`` and no choices, as OpenAI sends it."""
        ends = reasons if reasons is not None else {0: finish_reason}
        out = "".join(self._body([self._choice(i, None, r, None)]) for i, r in ends.items())
        if usage_counts is not None:
            out += self._body([], usage=usage_counts)
        return out + "data: [DONE]\n\n"


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape (the ``openai`` client raises its typed errors from it)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 422: "invalid_request_error",
             429: "rate_limit_error"}  # fmt: skip
    kind = kinds.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
