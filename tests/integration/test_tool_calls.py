"""Tool calls through the unmodified ``openai`` client, on SmolLM2 (a real tokenizer and chat
template) and its adapters, served in-process (the app a single replica serves over HTTP
itself): required and named choices conform to each function's parameters on every adapter and
temperature while sharing decoding steps; a call, its result and the answer make a round trip
rendered exactly as documented; streamed tool-call deltas rebuild the unstreamed answer; an
adapter trained by lorafleet on tool-use rows calls the right function under ``auto`` while
the base beside it in the batch answers in text; bad tool input is a 400 naming the part while
other requests answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from infra.servers import AppServer
from storage.catalog import repository as repo
from storage.registry import Registry
from storage.settings import load_settings, settings_for_nodes
from tests.helpers import random_adapter

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}  # fmt: skip
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@dataclass
class Served:
    url: str
    token: str
    models: list[str]
    tokenizer: Any
    agent: str  # an adapter trained on tool-use rows

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.token, max_retries=0)


CITIES = ["Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Berlin", "Madrid", "Dublin",
          "Seoul", "Delhi", "Paris"]  # fmt: skip


def _tool_rows(path: Path) -> Path:
    """Tool-use rows in OpenAI's fine-tuning form: weather questions call get_weather, time
    questions get_time."""
    rows = []
    for i, city in enumerate(CITIES):
        if i % 2 == 0:
            q, name, args = (
                f"What is the weather in {city}?",
                "get_weather",
                {"city": city, "unit": "celsius"},
            )
        else:
            q, name, args = f"What time is it in {city}?", "get_time", {"city": city}
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}  # fmt: skip
        rows.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": None, "tool_calls": [call]}]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trained_agent(base_dir: Path, root: Path) -> Path:
    from workers.lora import LoraConfig
    from workers.training.settings import TrainConfig
    from workers.training.single import train_single

    result = train_single(
        base_dir=base_dir, data_path=_tool_rows(root / "tools.jsonl"), out_dir=root / "agent",
        lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=10, batch_size=4, seq_len=384, eval_every=0,
                          warmup_steps=2, lr=5e-3),
    )  # fmt: skip
    return Path(result.adapter_dir)


@pytest.fixture(scope="module")
def served(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from workers.serving import ingress
    from workers.serving.options import ServeOptions

    root = tmp_path_factory.mktemp("tools")
    settings = load_settings({"LORAFLEET_HOME": str(root / "home")})
    registry = Registry.from_settings(settings)
    registry.register_base(name="smollm2", path=smollm_dir)
    refs = [registry.publish(adapter_dir=random_adapter(smollm_dir, root / f"a{k}", k),
                             ref=f"team/a{k}", base_model="smollm2").ref
            for k in range(2)]  # fmt: skip
    agent = registry.publish(adapter_dir=_trained_agent(smollm_dir, root), ref="team/agent",
                             base_model="smollm2").ref  # fmt: skip
    token = repo.create_token(registry.catalog, namespace="team", name="tools")
    opts = ServeOptions(base_name="smollm2", settings_json=settings_for_nodes(settings),
                        slots=4, max_rank=8, max_batch_size=32, usage_flush_s=0.5)  # fmt: skip
    service = ingress.Service(opts, None)
    ingress.register(service)
    server = AppServer(ingress.app)
    try:
        yield Served(server.url, token, ["smollm2", *refs], service.front.tokenizer, agent)
    finally:
        server.stop()
        service.close()
        ingress._SERVICE.remove(service)
        registry.catalog.dispose()


def _check_calls(message: Any, names: set[str], *, one: bool) -> None:
    assert message.content is None
    calls = message.tool_calls
    assert calls and (len(calls) == 1 or not one)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_required_and_named_calls_conform_on_every_adapter_and_temperature(
    served: Served,
) -> None:
    client = served.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    cases = [(model, temp, choice) for model in served.models for temp in (0.0, 0.8, 1.3)
             for choice in ("required", named)]  # fmt: skip

    def ask(case: tuple[str, float, Any]) -> Any:
        model, temp, choice = case
        return client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=temp,
            seed=5, n=2, max_tokens=96, parallel_tool_calls=False,
        )  # fmt: skip

    with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: they share decoding steps
        answers = list(pool.map(ask, cases))
    checked = 0
    for (model, _, choice), r in zip(cases, answers, strict=True):
        assert r.model.startswith(model)
        for c in r.choices:
            assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
            names = {"get_time"} if choice is named else set(PARAMS)
            _check_calls(c.message, names, one=True)
            checked += 1
    assert checked == len(cases) * 2  # every answer: 100 % valid calls


def test_a_call_its_result_and_the_answer_make_a_round_trip(served: Served) -> None:
    from workers.serving.openai_api import ChatCompletionRequest, chat_prompt_ids

    client = served.client()
    first = client.chat.completions.create(
        model=served.models[1], messages=ASK, tools=TOOLS, tool_choice="required",
        max_tokens=96, temperature=0,
    )  # fmt: skip
    message = first.choices[0].message
    _check_calls(message, set(PARAMS), one=False)
    results = [{"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 18, "sky": "cloudy"})}
               for call in message.tool_calls or ()]  # fmt: skip
    # the client's own message object goes back, as OpenAI's docs do it
    sent: list[Any] = [*ASK, message, *results]
    history = [*ASK, message.model_dump(exclude_none=True), *results]
    second = client.chat.completions.create(
        model=served.models[1], messages=sent, tools=TOOLS, tool_choice="none",
        max_tokens=24, temperature=0,
    )  # fmt: skip
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    # the server rendered exactly the documented conversation: calls and results included
    request = {"model": "m", "messages": history, "tools": TOOLS, "tool_choice": "none"}
    body = ChatCompletionRequest.model_validate(request)
    ids = chat_prompt_ids(served.tokenizer, body.messages, body.tool_plan())
    assert second.usage is not None and second.usage.prompt_tokens == len(ids)
    text = served.tokenizer.decode(ids)
    assert "<tool_response>" in text and message.tool_calls[0].function.name in text  # type: ignore[index]
    assert "# Tools" not in text  # tool_choice none: not offered


def test_streamed_tool_call_deltas_rebuild_the_answer(served: Served) -> None:
    client = served.client()
    kw: dict[str, Any] = {"model": served.models[2], "messages": ASK, "tools": TOOLS,
                          "tool_choice": "required", "max_tokens": 120,
                          "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish, content, chunks = None, "", 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                if d.index not in calls:  # a call's first delta: id, type, name, no arguments
                    assert d.id and d.type == "function" and d.function is not None
                    assert d.function.name and d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function is not None
                    calls[d.index]["arguments"] += d.function.arguments or ""
                    chunks += 1
            finish = c.finish_reason or finish
    # greedy: the same tokens streamed or not (parallel calls: until it stops or max_tokens)
    assert content == "" and finish == whole.finish_reason
    assert chunks > len(calls) >= 1  # arguments came in fragments, as decoded
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()
    ]
    one = client.chat.completions.create(**kw, stream=True, parallel_tool_calls=False)
    finishes = [c.finish_reason for chunk in one for c in chunk.choices if c.finish_reason]
    assert finishes == ["tool_calls"]


def test_a_trained_tool_adapter_calls_under_auto_while_the_base_answers_in_text(
    served: Served,
) -> None:
    client = served.client()
    asks = [("What is the weather in Vienna?", "get_weather"),
            ("What time is it in Boston?", "get_time"),
            ("What is the weather in Nairobi?", "get_weather")]  # fmt: skip

    def ask(case: tuple[str, str]) -> Any:
        model, question = case
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], tools=TOOLS,
            max_tokens=48, temperature=0,
        )  # fmt: skip

    cases = [(m, q) for q, _ in asks for m in (served.agent, "smollm2")]
    with ThreadPoolExecutor(len(cases)) as pool:  # the adapter and the base share steps
        answers = list(pool.map(ask, cases))
    for (model, question), r in zip(cases, answers, strict=True):
        c = r.choices[0]
        if model == "smollm2":  # the base was never taught to call: text, no calls
            assert c.message.tool_calls is None and c.message.content
            assert c.finish_reason in ("stop", "length")
            continue
        want = dict(asks)[question]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert [t.function.name for t in c.message.tool_calls or ()] == [want]
        args = json.loads(c.message.tool_calls[0].function.arguments)  # type: ignore[index]
        jsonschema.validate(args, PARAMS[want])
        assert args["city"] == question.removesuffix("?").split()[-1]
    streamed = client.chat.completions.create(
        model=served.agent, messages=[{"role": "user", "content": asks[0][0]}], tools=TOOLS,
        max_tokens=48, temperature=0, stream=True,
    )  # fmt: skip
    deltas = [c.delta for chunk in streamed for c in chunk.choices]
    calls = [t for d in deltas for t in d.tool_calls or ()]
    names = [t.function.name for t in calls if t.function and t.function.name]
    args = "".join(t.function.arguments or "" for t in calls if t.function)
    assert names == ["get_weather"] and json.loads(args)["city"] == "Vienna"
    assert not any(d.content for d in deltas)


def test_bad_tool_input_is_a_400_naming_the_part_and_others_answer(served: Served) -> None:
    client = served.client()
    bad_schema = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "no-such-type"}},
    }
    huge = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                         for i in range(400)}}}}  # fmt: skip
    bad = [
        ({"tools": [WEATHER, bad_schema], "tool_choice": "required"},
         "tools[1].function.parameters"),
        ({"tools": [huge]}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ]  # fmt: skip

    def good() -> Any:
        return client.chat.completions.create(model=served.models[1], messages=ASK, tools=TOOLS,
                                              tool_choice="required", max_tokens=96)  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(good)
        for kw, part in bad:
            with pytest.raises(openai.BadRequestError) as exc:
                client.chat.completions.create(model=served.models[1], messages=ASK,
                                               max_tokens=8, **kw)  # fmt: skip
            assert part in str(exc.value) and exc.value.param == part, (part, exc.value.param)
        answer = ok.result(timeout=300).choices[0]
    assert answer.finish_reason == "tool_calls"
    _check_calls(answer.message, set(PARAMS), one=False)
    # fields that would change the answer and are not implemented: refused, named
    for kw, part in (({"reasoning_effort": "high"}, "reasoning_effort"),
                     ({"messages": [{"role": "user", "content": "x", "name": "bob"}]},
                      "messages.0.name")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(**{"model": "smollm2", "messages": ASK,
                                              "max_tokens": 2, **kw})  # fmt: skip
        assert exc.value.param == part, exc.value.param
    with pytest.raises(openai.BadRequestError, match="tools"):  # completions: chat only
        client.completions.create(model="smollm2", prompt="x", max_tokens=2,
                                  extra_body={"tools": TOOLS})  # fmt: skip
