"""Tool calls without a model: the plan of a request's tool fields, prompts in the default and
the native form, the parser (whole and streamed agree for every split), and the grammars on
synthetic logits (whatever the logits, a required call names a known function with arguments
that conform to its parameters)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import masked_decode
from workers import tool_calls as tc
from workers.serving.openai_api import ChatCompletionRequest, StreamFormatter, chat_prompt_ids

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}  # fmt: skip
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "additionalProperties": False,
                                  "required": ["a", "b"],
                                  "properties": {"a": {"type": "integer"},
                                                 "b": {"type": "integer"}}}}}  # fmt: skip
TOOLS = [WEATHER, ADD]


def _chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


# -- plans ------------------------------------------------------------------------------------
def test_tool_choice_defaults_follow_openai() -> None:
    assert tc.plan(None, None) is None
    p = tc.plan(TOOLS, None)
    assert p is not None and p.mode == "auto" and p.parallel and p.parses
    assert p.names() == {"get_weather", "add"}
    named = tc.plan(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named is not None and named.mode == "required" and not named.parallel
    assert [f.name for f in named.functions] == ["add"] and len(named.tools) == 2
    none = tc.plan(TOOLS, "none")
    assert none is not None and not none.parses
    assert tc.plan(TOOLS, "required", False).parallel is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [ADD, ADD]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
         "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [ADD] * 200}, "tools"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_named(kw: dict[str, Any], names: str) -> None:
    with pytest.raises(ValidationError) as exc:
        _chat(**kw)
    assert f"{names}: " in str(exc.value)


def test_history_with_calls_and_results_is_checked() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    good = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"}]  # fmt: skip
    assert len(_chat(tools=[ADD], messages=good).messages) == 3
    orphan = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9",
                                                  "content": "5"}]  # fmt: skip
    wrong_id = [*good[:2], {"role": "tool", "tool_call_id": "c2", "content": "5"}]
    for messages in (orphan, wrong_id):
        with pytest.raises(ValidationError, match="tool_call_id"):
            _chat(messages=messages)
    with pytest.raises(ValidationError, match="content"):
        _chat(messages=[{"role": "user", "content": None}])
    with pytest.raises(ValidationError, match="tool_calls"):
        _chat(messages=[{"role": "user", "content": "x", "tool_calls": [call]}])
    with pytest.raises(ValidationError):  # images are not read: refused, not dropped
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    parts = _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]},
                            {"role": "user", "content": "x"}])  # fmt: skip
    assert parts.messages[0].text() == "ab"


# -- prompts ----------------------------------------------------------------------------------
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "function": {"name": "get_weather",
                                  "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "c2", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "5"},
]  # fmt: skip


def test_default_rendering_writes_tools_calls_and_results_as_plain_messages() -> None:
    tools = tc.parse_tools(TOOLS)
    msgs, specs = tc.render(HISTORY, tools, native=False)
    assert specs is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    for tool in TOOLS:  # each signature, as the caller wrote it, in the system message
        assert json.dumps(tool) in msgs[0]["content"]
    assert msgs[2]["content"] == (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a":2,"b":3}}\n</tool_call>'
    )
    assert msgs[3]["content"] == (
        "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n5\n</tool_response>"
    )
    alone, _ = tc.render(HISTORY[1:2], tools, native=False)  # no system message: one is added
    assert alone[0]["role"] == "system" and alone[0]["content"].startswith("# Tools")
    bare, _ = tc.render(HISTORY[1:2], (), native=False)
    assert bare == [{"role": "user", "content": "Weather in Paris and 2+3?"}]


class _RecordingTokenizer:
    """A tokenizer whose template renders tools (names the variable): records what it got."""

    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        self.calls.append((messages, kw))
        return [1, 2, 3]


def test_a_template_that_renders_tools_gets_them_in_hugging_face_form() -> None:
    tok = _RecordingTokenizer()
    body = _chat(messages=HISTORY, tools=TOOLS)
    assert chat_prompt_ids(tok, body.messages, body.tool_plan()) == [1, 2, 3]
    messages, kw = tok.calls[-1]
    assert kw["tools"] == TOOLS and kw["add_generation_prompt"] is True
    call = messages[2]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather",
                                "arguments": {"city": "Paris", "unit": "celsius"}}  # fmt: skip
    assert messages[3] == {"role": "tool", "content": "18 C", "tool_call_id": "c1"}
    chat_prompt_ids(tok, body.messages, _chat(tools=TOOLS, tool_choice="none").tool_plan())
    assert "tools" not in tok.calls[-1][1]  # under "none" the model is not offered them


# -- parsing ----------------------------------------------------------------------------------
ANSWERS = [
    'Let me check.\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa}ris","unit":'
    '"celsius"}}\n</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a":2,"b":3}}\n'
    "</tool_call>",
    "No tools needed: 5.",
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [1, "]"]}}\n</tool_call>',
    '<tool_call>\n{"arguments":{"a":1},"name":"add"}\n</tool_call> then text',
    '<tool_call>\n{"name":"rm_rf","arguments":{}}\n</tool_call>',  # unknown: content
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"name":"add","arguments":"{\\"a\\":1}"}\n</tool_call>',
    '<tool_call>\n{"name":"add","arguments":{"a":1,',  # cut by max_tokens
    "a < b and <tool_ then <tool_call",
]


def test_answers_parse_into_content_and_calls() -> None:
    p = tc.plan(TOOLS, "auto")
    assert p is not None
    content, calls = tc.parse(ANSWERS[0], p)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Pa}ris", "unit": "celsius"}),
        ("add", {"a": 2, "b": 3}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert tc.parse(ANSWERS[1], p) == ("No tools needed: 5.", [])
    assert json.loads(tc.parse(ANSWERS[2], p)[1][0].arguments) == {"a": 1, "b": [1, "]"]}
    content, calls = tc.parse(ANSWERS[3], p)  # arguments first: parsed when the block ends
    assert content == "then text" and calls[0].arguments == '{"a":1}'
    for bad in ANSWERS[4:6]:  # not a call of a known function: the text stays content
        assert tc.parse(bad, p) == (bad, [])
    assert tc.parse(ANSWERS[6], p)[1][0].arguments == '{"a":1}'
    content, calls = tc.parse(ANSWERS[7], p)  # what was decoded of the arguments
    assert content is None and calls[0].arguments == '{"a":1,'
    assert tc.parse(ANSWERS[8], p) == (ANSWERS[8], [])
    one = tc.plan(TOOLS, "auto", False)
    assert one is not None
    assert [c.name for c in tc.parse(ANSWERS[0], one)[1]] == ["get_weather"]


@pytest.mark.parametrize("seed", range(6))
def test_a_streamed_answer_equals_the_whole_one_for_any_split(seed: int) -> None:
    p = tc.plan(TOOLS, "auto")
    assert p is not None
    rng = random.Random(seed)
    for text in ANSWERS:
        content, calls = tc.parse(text, p)
        stream = tc.ToolCallStream(p.names(), p.parallel)
        events: list[tuple[str, Any]] = []
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 7)
            events += stream.feed(text[i:j])
            i = j
        events += stream.close()
        got = "".join(v for k, v in events if k == "content")
        assert (got or None) == content
        heads = [v for k, v in events if k == "call"]
        assert [h[1].name for h in heads] == [c.name for c in calls]
        args: dict[int, str] = {}
        for k, v in events:
            if k == "args":
                args[v[0]] = args.get(v[0], "") + v[1]
        assert [args.get(i, "") for i in range(len(calls))] == [c.arguments for c in calls]


def test_tool_call_chunks_have_openai_shapes() -> None:
    fmt = StreamFormatter("m", chat=True)
    head = json.loads(fmt.tool_delta(0, 0, call=tc.ToolCall("call_x", "add"))[6:])
    delta = head["choices"][0]["delta"]
    assert delta == {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_x", "type": "function",
         "function": {"name": "add", "arguments": ""}}]}  # fmt: skip
    more = json.loads(fmt.tool_delta(0, 0, arguments='{"a"')[6:])["choices"][0]["delta"]
    assert more == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}


# -- grammars on synthetic logits ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tiny_base_dir: Path) -> Any:
    pytest.importorskip("llguidance")
    from workers.base_model import load_tokenizer
    from workers.serving.grammar import GrammarCache

    return GrammarCache(load_tokenizer(tiny_base_dir))


@pytest.mark.parametrize("seed", range(6))
def test_required_and_named_calls_conform_whatever_the_logits(cache: Any, seed: int) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    named = {"type": "function", "function": {"name": "add"}}
    for choice, parallel in (("required", True), ("required", False), (named, True)):
        p = tc.plan(TOOLS, choice, parallel)
        assert p is not None
        text = masked_decode(cache, cache.compiled_tools(p).grammar, seed, 600)
        content, calls = tc.parse(text, p)
        assert content is None and calls, text
        if not p.parallel:
            assert len(calls) == 1
        for c in calls:
            assert c.name in p.names()
            jsonschema.validate(json.loads(c.arguments), params[c.name])


def test_auto_lets_text_through_but_an_opened_call_must_be_valid(cache: Any) -> None:
    p = tc.plan(TOOLS, "auto")
    assert p is not None
    row = cache.compiled_tools(p).row()
    tok = cache.tokenizer
    for t in tok.tokenize_str("Sure, 2+3 is easy. <tool_call>\n"):
        row.advance(t)  # free text, then the trigger: allowed
    logits = torch.zeros(cache.vocab_size)
    row.mask(logits)
    allowed = {tok.decode_str([t]) for t in torch.nonzero(logits == 0).flatten().tolist()}
    assert allowed and all('{"name":"'.startswith(a) or a.startswith("{") for a in allowed)


def test_bad_parameter_schemas_are_named_by_their_tool(cache: Any) -> None:
    from workers.serving.grammar import GrammarError

    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "no-such"}}}
    p = tc.plan([ADD, bad], "required")
    assert p is not None
    with pytest.raises(GrammarError, match=r"^tools\[1\]\.function\.parameters: "):
        cache.compiled_tools(p)
    auto = tc.plan([ADD], "auto")
    assert auto is not None
    hits = cache.hits
    cache.compiled_tools(auto)
    cache.compiled_tools(auto)
    assert cache.hits >= hits + 2  # compiled once, then found


# -- training rows ----------------------------------------------------------------------------
def test_a_tool_row_trains_on_exactly_what_the_server_prompts_and_parses(base: Any) -> None:
    from workers.datasets import IGNORE_INDEX, tokenize_row, validate_row

    _, tok = base
    call = {"id": "c1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}  # fmt: skip
    row = validate_row({"tools": TOOLS, "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "It is 5."}]}, "t.jsonl:1")  # fmt: skip
    ex = tokenize_row(row, tok)
    first = ex.labels.index(next(t for t in ex.labels if t != IGNORE_INDEX))
    # the prompt before the first trained token is what the server sends the model
    request = _chat(messages=row["messages"][:1], tools=TOOLS)
    assert list(ex.input_ids[:first]) == chat_prompt_ids(tok, request.messages,
                                                         request.tool_plan())  # fmt: skip
    trained = [t for t in ex.labels if t != IGNORE_INDEX]
    p = request.tool_plan()
    assert p is not None
    content, calls = tc.parse(tok.decode(trained, skip_special_tokens=True), p)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert content is not None and content.endswith("It is 5.")  # the answer after the result
    assert "<tool_response>" in tok.decode(list(ex.input_ids))  # results are prompt, not loss
    assert "<tool_response>" not in tok.decode(trained)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}],
          "messages": [{"role": "assistant", "content": "x"}]}, "tools[0].function.name"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "tool_calls"),
        ({"messages": [{"role": "assistant", "content": None,
                        "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "tool_calls[0].function.name"),
        ({"messages": [{"role": "assistant", "content": None}]}, "content"),
    ],
)  # fmt: skip
def test_bad_tool_rows_are_named_with_their_line(row: dict[str, Any], words: str) -> None:
    from workers.datasets import validate_row
    from workers.errors import DatasetError

    with pytest.raises(DatasetError, match=r"^t\.jsonl:7: .*" + words.replace("[", r"\[")):
        validate_row(row, "t.jsonl:7")


@pytest.mark.parametrize("seed", range(4))
def test_auto_with_a_response_format_is_a_document_or_calls(cache: Any, seed: int) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    p = tc.plan(TOOLS, "auto")
    assert p is not None
    text = masked_decode(cache, cache.compiled_tools(p, schema).grammar, seed, 600)
    content, calls = tc.parse(text, p)
    if calls:
        assert content is None
        for c in calls:
            json.loads(c.arguments)
    else:
        jsonschema.validate(json.loads(text), schema)


def test_a_replicas_grammar_refusal_names_the_request_field() -> None:
    from workers.serving.frontend import engine_failure

    assert engine_failure("invalid", "schema: nested too deep").param == "response_format"
    named = engine_failure("invalid", "tools[1].function.parameters: unknown type")
    assert named.param == "tools[1].function.parameters" and named.status == 400
    assert engine_failure("not_found", "adapter team/x not found").param == "model"
    assert engine_failure(None, "tools went away: boom").param == "model"
    assert engine_failure(None, "boom").status == 500
