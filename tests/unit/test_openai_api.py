"""The OpenAI wire format: request validation, responses, stream chunks, chat prompts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from workers.serving.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamFormatter,
    chat_prompt_ids,
    completion_response,
    error_body,
    error_param,
)


def test_completion_defaults_follow_openai() -> None:
    req = CompletionRequest(model="team/x@production", prompt="hi", stream_options={"x": 1})
    assert (req.limit(), req.temperature, req.top_p, req.stops()) == (16, 1.0, 1.0, ())
    assert CompletionRequest(model="m", prompt=["hi"], stop="\n").stops() == ("\n",)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [3, -1]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": "x", "max_tokens": 0, "echo": False}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "best_of": 4}, "best_of"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "logit_bias": {"7": 100}}, "logit_bias"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": "not an object"},
                },
            },
            "response_format",
        ),
        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "x", "temperature": 1e-40}, "temperature"),
        ({"prompt": "x", "stop": "s" * 10_000_000}, "stop"),
        ({"prompt": "x" * 20_000_000}, "prompt"),
    ],
)
def test_bad_completion_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        CompletionRequest(model="m", **body)
    first = err.value.errors()[0]
    assert error_param(first["loc"], first["msg"]) == field


def test_chat_request_checks_roles_and_takes_max_completion_tokens() -> None:
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                max_completion_tokens=5, max_tokens=9)  # fmt: skip
    assert req.limit() == 5
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(ValidationError, match="assistant"):
        ChatCompletionRequest(model="m", messages=[{"role": "assistant", "content": "x"}])


def test_chat_prompt_renders_like_the_trainer(base) -> None:  # type: ignore[no-untyped-def]
    from workers.datasets import tokenize_row

    _, tok = base
    msgs = [ChatMessage(role="user", content="spell 4 =")]
    prompt = chat_prompt_ids(tok, msgs)
    row = {"messages": [m.model_dump() for m in msgs] + [{"role": "assistant", "content": "four"}]}
    example = tokenize_row(row, tok)
    first_label = next(i for i, label in enumerate(example.labels) if label != -100)
    assert list(example.input_ids[:first_label]) == prompt  # the answer starts where we generate


def test_responses_and_stream_chunks_have_openai_shapes() -> None:
    r = completion_response("team/x:3", "four", "stop", 4, 2)
    assert r["model"] == "team/x:3" and r["choices"][0]["text"] == "four"
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    fmt = StreamFormatter("team/x:3", chat=True)
    first = json.loads(fmt.delta("fo").removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "fo"}
    assert first["object"] == "chat.completion.chunk"
    end = fmt.finish("stop").split("\n\n")
    assert json.loads(end[0].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"
    assert end[1] == "data: [DONE]"
    assert error_body("nope", 404)["error"]["type"] == "not_found_error"


def test_chat_bounds_and_what_stays_allowed() -> None:
    many = [{"role": "user", "content": "hi"}] * 100_000
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest(model="m", messages=many)
    with pytest.raises(ValidationError, match="characters"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x" * 8_000_000}])
    ok = CompletionRequest(model="m", prompt="x", seed=2**64 - 1, temperature=0, stop=["a" * 128])
    assert ok.seed == 2**64 - 1 and ok.temperature == 0
    assert CompletionRequest(model="m", prompt="x", temperature=0.01).temperature == 0.01
