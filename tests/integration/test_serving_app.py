"""The Ray Serve app end to end: the official ``openai`` client, exactness against PEFT, load
across 20 adapters through 4 slots, alias promotion, faults, namespaces, replica recovery.

One app (the routing ingress in front of 1 model replica, 4 slots, alias TTL 0.5 s) is
deployed on the session's 2-node Ray cluster for the whole module; the replica-kill test runs
last. ``lorafleet serve``'s one-replica shape (the replica answers HTTP itself) is driven by
tests/e2e (test_serve_cli.py, test_lm_eval.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from infra.servers import free_port, wait_until
from storage.catalog import repository as repo
from storage.objects import LocalObjectStore
from storage.registry import Registry
from storage.settings import load_settings, settings_for_nodes
from tests.helpers import random_adapter
from tests.integration.conftest import NODE_ADMIN_TOKEN as ADMIN
from workers.base_model import load_base
from workers.demo_task import TRAIN_FILE
from workers.generate import greedy_generate
from workers.lora import LoraConfig, load_adapter
from workers.training.recipe import TrainConfig
from workers.training.single import train_single

PROMPTS = ["spell 4 2 =", "hello world"]
N_LOAD = 20


@dataclass
class App:
    url: str
    registry: Registry
    team_token: str
    dirs: dict[str, Path]

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token or self.team_token,
                             max_retries=0, timeout=120)  # fmt: skip

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/v1/serving/stats", headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()
        return r.json()


def _random_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, **kw: object) -> Path:
    return random_adapter(base_dir, out, seed, r=r, targets="all-linear", scale=0.2, **kw)


def _peft_adapter(base_dir: Path, out: Path) -> Path:
    model, _ = load_base(base_dir)
    torch.manual_seed(123)
    peft_model = get_peft_model(
        model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    return out


def _reference(base_dir: Path, adapter_dir: Path | None, prompts: list[str], n: int) -> list[str]:
    """Greedy answers on the single-adapter path (our LoraLinear, HF generate)."""
    model, tok = load_base(base_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return greedy_generate(model, tok, prompts, max_new_tokens=n)


@pytest.fixture(scope="module")
def app(ray_cluster: object, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[App]:  # fmt: skip
    from workers.serving.deployments import ServeOptions, start, stop

    root = tmp_path_factory.mktemp("serving")
    settings = load_settings({"LORAFLEET_HOME": str(root / "home"), "LORAFLEET_API_TOKEN": ADMIN})
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=tiny_base_dir)
    dirs: dict[str, Path] = {}
    trained = train_single(
        base_dir=tiny_base_dir, data_path=TRAIN_FILE, out_dir=root / "trained",
        lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=20, batch_size=8, seq_len=48, eval_every=0, warmup_steps=2),
    )  # fmt: skip
    dirs["team/trained"] = trained.adapter_dir
    dirs["team/ours"] = _random_adapter(tiny_base_dir, root / "ours", 1, r=8, use_rslora=True)
    dirs["team/peft"] = _peft_adapter(tiny_base_dir, root / "peft")
    dirs["other/secret"] = _random_adapter(tiny_base_dir, root / "secret", 2)
    for i in range(N_LOAD):
        dirs[f"load/a{i:02d}"] = _random_adapter(tiny_base_dir, root / f"a{i:02d}", 100 + i)
    for ref, d in dirs.items():
        registry.publish(adapter_dir=d, ref=ref, base_model="tiny")
    token = repo.create_token(registry.catalog, namespace="team", name="ci")
    repo.create_token(registry.catalog, namespace="load", name="ci")
    opts = ServeOptions(
        base_name="tiny", settings_json=settings_for_nodes(settings),
        slots=4, max_rank=16, alias_ttl_s=0.5, num_cpus=0.5, max_batch_size=64,
        usage_flush_s=0.5, ingress="separate",  # the routing ingress; "direct": tests/e2e
    )  # fmt: skip
    url = start(opts, port=free_port())
    try:
        yield App(url, registry, token, dirs)
    finally:
        stop()
        registry.catalog.dispose()


def _complete(client: openai.OpenAI, model: str, prompt: str, n: int = 8) -> tuple[str, str]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text, r.model


def test_health_is_open_and_models_are_namespaced(app: App) -> None:
    assert httpx.get(f"{app.url}/health").json()["status"] == "ok"
    ids = {m.id for m in app.client().models.list()}
    assert {"tiny", "team/trained:1", "team/ours:1", "team/peft:1"} <= ids
    assert not any(i.startswith(("other/", "load/")) for i in ids)
    admin_ids = {m.id for m in app.client(ADMIN).models.list()}
    assert "other/secret:1" in admin_ids and "load/a00:1" in admin_ids


def test_openai_client_completions_chat_and_stream(app: App, tiny_base_dir: Path) -> None:
    client = app.client()
    text, model = _complete(client, "team/ours", PROMPTS[0])
    assert model == "team/ours:1"  # the response names the exact version (lineage)
    assert text == _reference(tiny_base_dir, app.dirs["team/ours"], [PROMPTS[0]], 8)[0]
    chat = client.chat.completions.create(
        model="team/ours", messages=[{"role": "user", "content": "spell 1 2 ="}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert chat.model == "team/ours:1" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="team/ours", prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0, stream=True))  # fmt: skip
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat_chunks = list(client.chat.completions.create(
        model="team/ours", messages=[{"role": "user", "content": "spell 1 2 ="}],
        max_tokens=8, temperature=0, stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
    assert streamed == chat.choices[0].message.content
    # sampling with a seed is reproducible, whatever it is batched with
    a = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=1.0,
                                  seed=7)  # fmt: skip
    b = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=1.0,
                                  seed=7)  # fmt: skip
    assert a.choices[0].text == b.choices[0].text


def test_response_format_through_the_openai_client(app: App) -> None:
    import jsonschema

    client = app.client()
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"digit": {"enum": ["one", "two", "three"]},
                             "even": {"type": "boolean"}},
              "required": ["digit", "even"]}  # fmt: skip
    for model, temperature in (("team/ours", 0.0), ("team/trained", 1.0), ("tiny", 0.7)):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "spell 2 ="}], max_tokens=48,
            temperature=temperature, seed=3, n=2,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "digit", "schema": schema, "strict": True}},
        )  # fmt: skip
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
    streamed = client.chat.completions.create(
        model="team/trained", messages=[{"role": "user", "content": "spell 3 ="}],
        max_tokens=48, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
    )  # fmt: skip
    chunks = list(streamed)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)),
                        schema)  # fmt: skip
    obj = client.completions.create(model="team/ours", prompt="spell 1 =", max_tokens=64,
                                    temperature=0, extra_body={
                                        "response_format": {"type": "json_object"}})  # fmt: skip
    assert obj.choices[0].text.startswith("{")
    if obj.choices[0].finish_reason == "stop":  # ended by itself: a whole JSON object
        assert isinstance(json.loads(obj.choices[0].text), dict)
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(
            model="team/ours",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such"}},
            },
        )
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="team/ours",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            response_format={"type": "xml"},
        )  # type: ignore[arg-type]
    # a tool call through the routing ingress and a model replica (the tool plan travels)
    params = {"type": "object", "properties": {"digit": {"enum": ["one", "two"]}},
              "required": ["digit"], "additionalProperties": False}  # fmt: skip
    called = client.chat.completions.create(
        model="team/ours", messages=[{"role": "user", "content": "spell 2 ="}], max_tokens=90,
        temperature=0, tool_choice="required", parallel_tool_calls=False,
        tools=[{"type": "function", "function": {"name": "spell", "parameters": params}}],
    ).choices[0]  # fmt: skip
    assert called.finish_reason == "tool_calls" and called.message.content is None
    calls = called.message.tool_calls or []
    assert [c.function.name for c in calls] == ["spell"]
    jsonschema.validate(json.loads(calls[0].function.arguments), params)


def test_greedy_answers_equal_peft_for_three_adapters(app: App, tiny_base_dir: Path) -> None:
    client = app.client()
    for ref in ("team/trained", "team/ours", "team/peft"):
        base, tok = load_base(tiny_base_dir)
        peft_model = PeftModel.from_pretrained(base, app.dirs[ref])
        expected = greedy_generate(peft_model, tok, PROMPTS, max_new_tokens=8)
        served = [_complete(client, ref, p)[0] for p in PROMPTS]
        assert served == expected, ref


async def _burst(app: App, jobs: list[tuple[str, str]], token: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(jobs))
    async with httpx.AsyncClient(base_url=app.url, timeout=300, limits=limits) as http:
        return await asyncio.gather(*[
            http.post("/v1/completions", headers={"Authorization": f"Bearer {token}"},
                      json={"model": m, "prompt": p, "max_tokens": n, "temperature": 0})
            for m, p in jobs
        ])  # fmt: skip


def test_mixed_batch_gives_each_row_its_solo_answer(app: App) -> None:
    refs = ["team/trained", "team/ours", "team/peft", "tiny"]
    solo = {r: _complete(app.client(), r, PROMPTS[0])[0] for r in refs}
    jobs = [(r, PROMPTS[0]) for r in refs] * 4
    before = app.stats()["batches"]["max_adapters"]
    out = asyncio.run(_burst(app, jobs, app.team_token, 8))
    assert [r.status_code for r in out] == [200] * len(jobs)
    assert [r.json()["choices"][0]["text"] for r in out] == [solo[r] for r, _ in jobs]
    # requests for different adapters really shared one forward pass
    assert max(before, app.stats()["batches"]["max_adapters"]) >= 2


def test_bad_inputs_fail_alone_and_good_batch_mates_answer_as_alone(app: App) -> None:
    """Each hostile input of the review, sent in one burst with good requests: every bad one
    is a 4xx naming its field, and every good one gets the text it gets alone."""
    good = [("team/ours", PROMPTS[0]), ("tiny", PROMPTS[1]), ("team/peft", PROMPTS[0])]
    solo = [_complete(app.client(), m, p)[0] for m, p in good]
    bad: list[tuple[dict, str]] = [
        ({"seed": 2**64, "temperature": 0.7}, "seed"),
        ({"temperature": 1e-40}, "temperature"),
        ({"stop": ["s" * 1_000_000]}, None),  # over the body limit: refused unread (413)
        ({"prompt": "spell 1 =" * 200_000}, None),  # 1.8 MB of prompt: over the limit
        ({"max_tokens": 4096, "prompt": "spell 1 2 3 4 5 6 7 8 9 =" * 40}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 17}, "n"),
        ({"prompt": [5, 10**6]}, "prompt"),  # a token id outside the vocabulary
        ({"prompt": [[5, 6], [7, 99_999_999]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["spell 1 ="] * 65}, "prompt"),
        ({"echo": True, "stream": True}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"5": 100}}, "logit_bias"),
    ]

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        hdr = {"Authorization": f"Bearer {app.team_token}"}
        async with httpx.AsyncClient(base_url=app.url, timeout=300) as http:

            def post(body: dict) -> Any:
                return http.post("/v1/completions", headers=hdr, json=body)

            base = {"model": "team/ours", "prompt": PROMPTS[0], "max_tokens": 8}
            bad_f = [post({**base, **extra}) for extra, _ in bad]
            good_f = [post({"model": m, "prompt": p, "max_tokens": 8, "temperature": 0})
                      for m, p in good]  # fmt: skip
            out = await asyncio.gather(*bad_f, *good_f)
        return list(out[: len(bad)]), list(out[len(bad) :])

    bad_out, good_out = asyncio.run(burst())
    for (extra, field), r in zip(bad, bad_out, strict=True):
        assert 400 <= r.status_code < 500, (list(extra), r.status_code, r.text[:300])
        if field is not None:
            assert r.json()["error"]["param"] == field, r.text[:300]
    assert [r.status_code for r in good_out] == [200] * len(good)
    assert [r.json()["choices"][0]["text"] for r in good_out] == solo


def _peft_logprobs(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    base, _ = load_base(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_logprobs_echo_and_token_prompts_through_the_openai_client(
    app: App, tiny_base_dir: Path
) -> None:
    """What evaluation harnesses send: token-id prompts in a list, echo, max_tokens 0 or 1,
    logprobs — answered in OpenAI's shapes, with PEFT's values."""
    _, tok = load_base(tiny_base_dir)
    client = app.client()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    r = client.completions.create(model="team/peft", prompt=prompts, max_tokens=1, echo=True,
                                  logprobs=1, temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    for c, ids in zip(r.choices, prompts, strict=True):
        lp = c.logprobs
        assert lp is not None and len(lp.token_logprobs) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert c.text.startswith(tok.decode(ids))
        full = _peft_logprobs(tiny_base_dir, app.dirs["team/peft"], ids)
        for p in range(1, len(ids)):
            assert abs(lp.token_logprobs[p] - float(full[p - 1, ids[p]])) < 2e-3
        last = lp.token_logprobs[-1]  # the one generated token: greedy, so the top one
        assert abs(last - max(lp.top_logprobs[-1].values())) < 1e-6
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    zero = client.completions.create(model="team/peft", prompt=PROMPTS[0], max_tokens=0,
                                     echo=True, logprobs=0)  # fmt: skip
    assert zero.choices[0].text == PROMPTS[0] and zero.usage.completion_tokens == 0
    five = client.completions.create(model="team/trained", prompt=PROMPTS[0], max_tokens=4,
                                     logprobs=5, temperature=0)  # fmt: skip
    lp5 = five.choices[0].logprobs
    assert len(lp5.tokens) == len(lp5.token_logprobs) == len(lp5.top_logprobs) == 4
    assert five.usage.completion_tokens == 4 and five.choices[0].finish_reason == "length"
    assert all(5 <= len(top) <= 6 for top in lp5.top_logprobs)  # top 5 and the chosen one
    # the trained adapter starts its answer with a word: the first token is the text's start
    assert lp5.tokens[0].strip() and five.choices[0].text.startswith(lp5.tokens[0])


def test_n_choices_and_prompt_lists_are_prompt_major_and_seeded(
    app: App, tiny_base_dir: Path
) -> None:
    _, tok = load_base(tiny_base_dir)
    client = app.client()
    r = client.completions.create(model="team/ours", prompt=PROMPTS, n=3, max_tokens=6,
                                  temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(PROMPTS):  # greedy: every choice of a prompt is its solo answer
        assert {c.text for c in r.choices[3 * i : 3 * i + 3]} == {_complete(client, "team/ours",
                                                                            p, 6)[0]}  # fmt: skip
    # each prompt counted once, every choice's tokens
    assert r.usage is not None and r.usage.prompt_tokens == sum(len(tok(p)["input_ids"])
                                                                for p in PROMPTS)  # fmt: skip
    sampled = [client.completions.create(model="tiny", prompt="hello", n=4, max_tokens=8,
                                         temperature=1.0, seed=3) for _ in range(2)]  # fmt: skip
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # reproducible, and not one answer
    chat = client.chat.completions.create(model="team/ours", n=2, temperature=1.0, seed=5,
                                          messages=[{"role": "user", "content": "spell 2 ="}],
                                          max_tokens=6, logprobs=True, top_logprobs=3)  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    for c in chat.choices:
        content = c.logprobs.content
        assert all(len(e.top_logprobs) == 3 for e in content)
        # the tokens' bytes make the message (a random adapter may end mid-character)
        raw = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
        assert raw.replace("\ufffd", "") == (c.message.content or "").replace("\ufffd", "")
    streamed = list(client.completions.create(model="team/ours", prompt=PROMPTS[0], n=2,
                                              max_tokens=6, temperature=0, stream=True,
                                              logprobs=2))  # fmt: skip
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    solo = _complete(client, "team/ours", PROMPTS[0], 6)[0]
    assert by_index == {0: solo, 1: solo}
    assert any(c.logprobs and c.logprobs.token_logprobs for ch in streamed for c in ch.choices)


def test_every_answer_names_the_bytes_that_made_it(app: App, tiny_base_dir: Path) -> None:
    import hashlib

    from workers.serving.provenance import system_fingerprint

    base_sha = hashlib.sha256((tiny_base_dir / "model.safetensors").read_bytes()).hexdigest()
    adapter_sha = hashlib.sha256(
        (app.dirs["team/ours"] / "adapter_model.safetensors").read_bytes()
    ).hexdigest()
    hdr = {"Authorization": f"Bearer {app.team_token}"}
    body = {"model": "team/ours", "prompt": PROMPTS[0], "max_tokens": 3}
    r = httpx.post(f"{app.url}/v1/completions", json=body, headers=hdr, timeout=60)
    assert r.headers["X-Lorafleet-Adapter-Sha256"] == adapter_sha
    assert r.headers["X-Lorafleet-Base-Sha256"] == base_sha
    assert r.json()["system_fingerprint"] == system_fingerprint(base_sha, adapter_sha)
    with httpx.stream("POST", f"{app.url}/v1/chat/completions", headers=hdr, timeout=60,
                      json={"model": "team/ours", "stream": True, "max_tokens": 3,
                            "messages": [{"role": "user", "content": "hi"}]}) as s:  # fmt: skip
        assert s.headers["X-Lorafleet-Adapter-Sha256"] == adapter_sha
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    assert {c["system_fingerprint"] for c in chunks} == {system_fingerprint(base_sha, adapter_sha)}
    plain = httpx.post(f"{app.url}/v1/completions", headers=hdr, timeout=60,
                       json={**body, "model": "tiny"})  # fmt: skip
    assert "X-Lorafleet-Adapter-Sha256" not in plain.headers
    assert plain.headers["X-Lorafleet-Base-Sha256"] == base_sha


def test_200_requests_across_20_adapters_through_4_slots(app: App, tiny_base_dir: Path) -> None:
    refs = [f"load/a{i:02d}" for i in range(N_LOAD)]
    expected = {r: _reference(tiny_base_dir, app.dirs[r], [PROMPTS[0]], 6)[0] for r in refs}
    token = repo.create_token(app.registry.catalog, namespace="load", name="burst")
    stats0 = app.stats()
    jobs = [(refs[i % N_LOAD], PROMPTS[0]) for i in range(200)]
    out = asyncio.run(_burst(app, jobs, token, 6))
    errors = [r.text for r in out if r.status_code != 200]
    assert errors == []
    got = [(r.json()["model"], r.json()["choices"][0]["text"]) for r in out]
    assert got == [(f"{m}:1", expected[m]) for m, _ in jobs]
    stats = app.stats()
    # every adapter was downloaded at most once (2 files each), though 20 went through 4 slots
    assert stats["disk"]["downloads"] - stats0["disk"]["downloads"] <= 2 * N_LOAD
    assert stats["slots"]["evictions"] > stats0["slots"]["evictions"]
    assert len(stats["slots"]["resident"]) <= 4
    assert stats["batches"]["max_rows"] > 1
    again = asyncio.run(_burst(app, jobs[:40], token, 6))
    assert all(r.status_code == 200 for r in again)
    assert app.stats()["disk"]["downloads"] == stats["disk"]["downloads"]  # host tier: no I/O


def test_alias_promotion_moves_traffic_within_ttl(app: App, tiny_base_dir: Path) -> None:
    client = app.client()
    app.registry.promote("team/ours:1", "production")
    assert _complete(client, "team/ours@production", PROMPTS[0])[1] == "team/ours:1"
    v2 = _random_adapter(tiny_base_dir, app.dirs["team/ours"].parent / "ours-v2", 77, r=8)
    app.registry.publish(adapter_dir=v2, ref="team/ours", base_model="tiny")
    app.registry.promote("team/ours:2", "production")
    promoted = time.monotonic()
    wait_until(lambda: _complete(client, "team/ours@production", PROMPTS[0])[1] == "team/ours:2",
               timeout_s=10, what="traffic on team/ours:2")  # fmt: skip
    assert time.monotonic() - promoted < 0.5 + 5  # the TTL plus request time, no restart
    assert _complete(client, "team/ours:1", PROMPTS[0])[1] == "team/ours:1"


def test_a_deleted_version_stops_being_served_within_the_ttl(app: App, tiny_base_dir: Path) -> None:
    client = app.client()
    doomed = _random_adapter(tiny_base_dir, app.dirs["team/ours"].parent / "doomed", 91, r=8)
    v = app.registry.publish(adapter_dir=doomed, ref="team/doomed", base_model="tiny")
    assert _complete(client, v.ref, PROMPTS[0])[1] == v.ref  # resident on the replica now
    app.registry.delete(v.ref)
    app.registry.gc(min_age_s=0)  # and its bytes collected
    deleted = time.monotonic()

    def gone() -> bool:
        try:
            _complete(client, v.ref, PROMPTS[0])
        except openai.NotFoundError:
            return True
        return False

    wait_until(gone, timeout_s=10, what="the deleted version to be refused")
    assert time.monotonic() - deleted < 0.5 + 5  # the TTL plus request time
    with pytest.raises(openai.NotFoundError):  # and it stays refused
        _complete(client, v.ref, PROMPTS[0])

    def dropped() -> bool:  # the replica's host and slot tiers let go of it too
        stats = app.stats()
        return v.ref not in stats["host"]["resident"] and v.ref not in stats["slots"]["resident"]

    wait_until(dropped, timeout_s=10, what="the replica to drop the deleted version")


def test_unknown_and_foreign_adapters_are_404_bad_tokens_401(app: App) -> None:
    client = app.client()
    with pytest.raises(openai.NotFoundError, match="team/nope"):
        _complete(client, "team/nope", "x")
    with pytest.raises(openai.NotFoundError):
        _complete(client, "other/secret", "x")  # another namespace's adapter does not exist
    with pytest.raises(openai.NotFoundError):
        _complete(client, "../../etc/passwd", "x")
    with pytest.raises(openai.AuthenticationError):
        _complete(app.client("wrong-token"), "tiny", "x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert _complete(app.client(ADMIN), "other/secret", PROMPTS[0])[1] == "other/secret:1"


def test_prewarm_then_corrupt_adapter_fails_alone(app: App) -> None:
    auth = {"Authorization": f"Bearer {app.team_token}"}
    r = httpx.post(f"{app.url}/v1/adapters/team/peft/load", headers=auth, timeout=60)
    assert r.status_code == 200 and "team/peft:1" in r.json()["host"]
    # corrupt the stored bytes of team/ours:1, then drop every cached copy
    version = app.registry.resolve("team/ours:1")
    store = app.registry.store
    assert isinstance(store, LocalObjectStore)
    path = store.root / f"{version.object_prefix}/adapter_model.safetensors"
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + b"\xff" * 8)
    r = httpx.post(f"{app.url}/v1/adapters/team/ours:1/unload", headers=auth, timeout=60)
    assert r.status_code == 200
    jobs = [("team/ours:1", PROMPTS[0]), ("team/peft", PROMPTS[0]), ("tiny", PROMPTS[0])]
    out = asyncio.run(_burst(app, jobs, app.team_token, 4))
    assert out[0].status_code == 502
    # a 5xx body is generic: no store path, digest or host, but the id of the log line
    message = out[0].json()["error"]["message"]
    assert "SHA-256" not in message and str(store.root) not in message and "/" not in message
    assert f"request id {out[0].headers['X-Request-Id']}" in message
    assert [r.status_code for r in out[1:]] == [200, 200]
    again = asyncio.run(_burst(app, jobs[:1], app.team_token, 4))
    assert again[0].status_code == 502  # still refused: corrupt bytes are never cached
    path.write_bytes(data)


def _metered(app: App, namespace: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    from storage.catalog import usage

    return {(u.namespace, u.model): (u.requests, u.prompt_tokens, u.completion_tokens)
            for u in usage.query_usage(app.registry.catalog, namespace=namespace)}  # fmt: skip


def test_metered_usage_equals_the_usage_fields_returned(app: App) -> None:
    """A namespace no other test uses: its buckets start empty, so once flushed they must equal
    the summed ``usage`` fields exactly (a lost or double count never gets there)."""
    from storage.catalog import usage

    for name, source in (("peft", "team/peft"), ("secret", "other/secret")):
        app.registry.publish(adapter_dir=app.dirs[source], ref=f"meter/{name}", base_model="tiny")
    client = app.client(repo.create_token(app.registry.catalog, namespace="meter", name="m"))
    want: dict[tuple[str, str], tuple[int, int, int]] = {}

    def count(key: tuple[str, str], u: Any) -> None:
        n, p, c = want.get(key, (0, 0, 0))
        want[key] = (n + 1, p + u.prompt_tokens, c + u.completion_tokens)

    for i in range(3):
        r = client.completions.create(model="meter/peft", prompt=f"spell {i} =",
                                      max_tokens=4 + i, temperature=0)  # fmt: skip
        count(("meter", "meter/peft:1"), r.usage)
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3,
            temperature=0)  # fmt: skip
        count(("meter", "tiny"), chat.usage)  # the bare base: the caller's namespace
    chunks = list(client.completions.create(
        model="meter/peft", prompt="spell 7 =", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    count(("meter", "meter/peft:1"), chunks[-1].usage)
    admin = app.client(ADMIN).completions.create(model="meter/secret", prompt="x", max_tokens=2,
                                                 temperature=0)  # fmt: skip
    count(("meter", "meter/secret:1"), admin.usage)  # an adapter: its own namespace
    wait_until(lambda: _metered(app, "meter") == want, timeout_s=60, what="usage flushed")

    # the replica tells the catalog what it holds: the API and console read it there
    def holds() -> bool:
        replicas = usage.live_replicas(app.registry.catalog)
        return len(replicas) == 1 and "meter/peft:1" in replicas[0].stats["host"]["resident"]

    wait_until(holds, timeout_s=30, what="the replica's snapshot")
    assert usage.live_replicas(app.registry.catalog)[0].stats["load_ms"]["count"] >= 1


def test_the_api_app_serves_the_console_under_its_route_prefix(app: App) -> None:
    """The RayService's second application (``orchestrator.api_app``) at ``/api``: the console
    page, its script, and the usage and serving the model server replica wrote."""
    from ray import serve

    from orchestrator.api_app import build
    from storage.settings import load_settings, settings_for_nodes

    db_path = app.registry.catalog.engine.url.database  # the module's catalog (no secrets sent)
    settings = load_settings({"LORAFLEET_CATALOG_URL": f"sqlite:///{db_path}",
                              "LORAFLEET_OBJECT_STORE": app.registry.store.uri})  # fmt: skip
    serve.run(build({"settings_json": settings_for_nodes(settings)}), name="lorafleet-api",
              route_prefix="/api", blocking=False)  # fmt: skip
    try:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        wait_until(lambda: httpx.get(f"{app.url}/api/health").status_code == 200, timeout_s=120,
                   what="the API app")  # fmt: skip
        page = httpx.get(f"{app.url}/api/")
        assert page.status_code == 200 and 'src="console/app.js"' in page.text
        assert "uPlot" in httpx.get(f"{app.url}/api/console/vendor/uPlot.iife.min.js").text
        assert httpx.get(f"{app.url}/api/v1/me", headers=auth).json()["namespace"] is None
        served = httpx.get(f"{app.url}/api/v1/usage", headers=auth).json()["data"]
        assert any(u["model"] == "meter/peft:1" for u in served)
        replicas = httpx.get(f"{app.url}/api/v1/serving", headers=auth).json()["replicas"]
        assert len(replicas) == 1 and replicas[0]["prefix_cache"]["enabled"] is True
        assert replicas[0]["prefix_cache"]["misses"] >= 1  # requests have come through
        assert _complete(app.client(), "team/peft", PROMPTS[0])[1] == "team/peft:1"  # unharmed
    finally:
        serve.delete("lorafleet-api")


def test_the_serving_app_survives_fuzzing_from_its_schema(app: App) -> None:
    """Every route of the serving app, with valid and invalid requests from its OpenAPI
    schema: never a 5xx, and every 400 or 422 names the parameter (OpenAI's ``param``)."""
    import schemathesis
    from schemathesis.checks import not_a_server_error

    from tests.integration.fuzzing import error_shape, fuzz

    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(f"{app.url}/v1/openapi.json").status_code == 401
    schema = schemathesis.openapi.from_url(f"{app.url}/v1/openapi.json", headers=auth)
    ran = fuzz(schema, [not_a_server_error, error_shape()], headers=auth, examples=15,
               timeout_s=120)  # fmt: skip
    assert any("/v1/chat/completions" in r for r in ran) and len(ran) >= 8
    assert _complete(app.client(), "team/peft", PROMPTS[0])[1] == "team/peft:1"  # still serving


def test_a_replica_killed_under_load_fails_only_its_requests_and_no_client_hangs(
    app: App,
) -> None:
    """Steady traffic while the model server replica is killed: requests fail (503, never a
    hang or a 500) only between the kill and the restarted replica's first answer; before and
    after, every request succeeds."""
    import threading

    import ray

    done: list[tuple[float, float, int | str]] = []  # (start, end, status or exception name)
    stop = threading.Event()

    def client() -> None:
        auth = {"Authorization": f"Bearer {app.team_token}"}
        with httpx.Client(base_url=app.url, timeout=60, headers=auth) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/completions", json={"model": "team/peft", "max_tokens": 6,
                                  "prompt": PROMPTS[0], "temperature": 0})  # fmt: skip
                    status: int | str = r.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                done.append((t0, time.monotonic(), status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(s == 200 for *_, s in done) >= 6, timeout_s=60, what="steady traffic")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "LoraModelServer" in a["name"]]  # fmt: skip
    assert names
    killed_at = time.monotonic()
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def recovered() -> bool:
        return any(s == 200 and t0 > killed_at for t0, _, s in done)

    wait_until(recovered, timeout_s=120, what="a restarted replica to answer")
    back_at = min(t0 for t0, _, s in done if s == 200 and t0 > killed_at)
    # requests sent in the first second after it may still meet the old replica's routing
    wait_until(lambda: sum(s == 200 and t0 > back_at + 1.0 for t0, _, s in done) >= 6,
               timeout_s=60, what="traffic after the restart")  # fmt: skip
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client is still waiting"
    failed = [(t0, t1, s) for t0, t1, s in done if s != 200]
    assert {s for *_, s in failed} <= {503}, failed  # a retryable answer, never 500 or a hang
    for t0, t1, _ in failed:  # only requests the kill caught, or sent before the new replica
        assert t1 >= killed_at and t0 <= back_at + 1.0, (t0, t1, killed_at, back_at)
    before = [s for t0, t1, s in done if t1 < killed_at]
    after = [s for t0, _, s in done if t0 > back_at + 1.0]
    assert before and set(before) == {200} and after and set(after) == {200}
