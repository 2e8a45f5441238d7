"""The OpenAI wire format: request models, response and stream-chunk builders, chat prompts.

Pure functions and pydantic models, no HTTP and no Ray, so they are unit-tested directly.
Defaults follow OpenAI's (``max_tokens`` 16, ``temperature`` 1); fields clients send that we
do not implement are accepted and ignored unless they would change the answer, in which case
they are refused with a message naming them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.datasets import DEFAULT_CHAT_TEMPLATE

MAX_TOKENS_LIMIT = 4096
# Bounds on what one request may ask, so no request can stall or break its batch-mates. The
# token budget (prompt + max_tokens ≤ the model's context) is checked after tokenization.
MIN_TEMPERATURE = 0.01  # 0 is greedy; below this, softmax(logits / t) is not a distribution
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator accepts
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 512
MAX_STOPS, MAX_STOP_CHARS = 4, 128
MAX_BODY_BYTES = 2 * 1024 * 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with ``usage`` (and no choices), as OpenAI's


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    logprobs: Any = None

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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request")
        text = v if isinstance(v, str) else v[0]
        if not text:
            raise ValueError("prompt is empty")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}"
            )
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def limit(self) -> int:
        return self.max_tokens or 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)

    @field_validator("messages")
    @classmethod
    def _last_not_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        # a field validator, so that an error names ``messages`` as its param
        if messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's")
        chars = sum(len(m.content) for m in messages)
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(
                f"messages have {chars:,} characters; the limit is {MAX_PROMPT_CHARS:,}"
            )
        return messages

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Render a conversation up to the assistant's turn, as the trainer renders chat rows."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return list(
        tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            chat_template=template,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
    )


def _ids(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _response(kind: str, obj: str, model: str, choice: dict[str, Any], prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:  # fmt: skip
    rid, created = _ids(kind)
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [{"index": 0, **choice, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def completion_response(
    model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``text_completion`` object; ``model`` is the exact adapter version used."""
    choice = {"text": text, "finish_reason": finish_reason}
    return _response("cmpl", "text_completion", model, choice, prompt_tokens, completion_tokens)


def chat_response(
    model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return _response("chatcmpl", "chat.completion", model, choice, prompt_tokens,
                     completion_tokens)  # fmt: skip


class StreamFormatter:
    """Server-sent-event chunks for one streamed answer (completion or chat)."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id, self.created = _ids("chatcmpl" if chat else "cmpl")
        self._first = True

    def _chunk(self, text: str | None, finish_reason: str | None) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if self._first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason,
                      "logprobs": None}  # fmt: skip
            obj = "text_completion"
        self._first = False
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    def delta(self, text: str) -> str:
        return self._chunk(text, None)

    def finish(self, finish_reason: str | None, usage_counts: dict[str, int] | None = None) -> str:
        """The last chunk; with ``usage_counts`` (``stream_options.include_usage``) one more
        chunk carrying ``usage`` and no choices, as OpenAI sends it."""
        tail = ""
        if usage_counts is not None:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                    "choices": [], "usage": usage_counts}  # fmt: skip
            tail = f"data: {json.dumps(body)}\n\n"
        return self._chunk(None, finish_reason) + tail + "data: [DONE]\n\n"


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape (the ``openai`` client raises its typed errors from it)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 422: "invalid_request_error",
             429: "rate_limit_error"}  # fmt: skip
    kind = kinds.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
