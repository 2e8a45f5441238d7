"""Structured outputs on SmolLM2 (a real tokenizer): JSON-schema-constrained rows of several
adapters and temperatures share decoding steps with free rows; every constrained answer that
ends by itself is JSON that conforms, one cut by ``max_tokens`` says ``length``, and a free row
answers exactly what it answers alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from storage.registry import Registry
from storage.settings import load_settings
from tests.helpers import random_adapter

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"city": {"type": "string", "maxLength": 24},
                         "country": {"enum": ["France", "Italy", "Spain", "other"]},
                         "population_millions": {"type": "integer", "minimum": 0,
                                                 "maximum": 100},
                         "coastal": {"type": "boolean"}},
          "required": ["city", "country", "population_millions", "coastal"]}  # fmt: skip


def _run(engine: Any, requests: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(requests)
    done = threading.Semaphore(0)
    for i, req in enumerate(requests):

        def finish(results: Any, i: int = i) -> None:
            out[i] = results
            done.release()

        engine.submit(req, finish)
    for _ in requests:
        assert done.acquire(timeout=300)
    return out


def test_constrained_and_free_rows_share_steps(smollm_dir: Path, tmp_path: Path) -> None:
    from workers.serving.engine import GenRequest, ServingEngine
    from workers.serving.openai_api import ChatMessage, chat_prompt_ids

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    registry.register_base(name="smollm2", path=smollm_dir)
    refs = [
        registry.publish(
            adapter_dir=random_adapter(smollm_dir, tmp_path / f"a{k}", k),
            ref=f"team/a{k}",
            base_model="smollm2",
        ).ref
        for k in range(2)
    ]
    engine = ServingEngine(registry.base_dir("smollm2"), registry, slots=4, max_rank=8)
    tok = engine.tokenizer
    chat = [ChatMessage(role="user", content="Describe Marseille as JSON.")]
    prompt = chat_prompt_ids(tok, chat)
    free = GenRequest(prompt, adapter=refs[0], max_tokens=24)
    alone = _run(engine, [free])[0][0]
    constrained = [GenRequest(prompt, adapter=a, max_tokens=160, temperature=t, seed=s, n=2,
                              schema=SCHEMA)
                   for a in (*refs, None) for t, s in ((0.0, None), (1.0, 7))]  # fmt: skip
    cut = GenRequest(prompt, adapter=refs[1], max_tokens=3, schema=SCHEMA)
    results = _run(engine, [*constrained, free, cut])
    assert engine.stats()["batches"]["max_rows"] >= 8  # they shared decoding steps
    engine.close()
    answers = [r for rs in results[: len(constrained)] for r in rs]
    assert len(answers) == 12
    for r in answers:
        assert r.error is None, r.error
        assert r.finish_reason == "stop", (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert results[-2][0].text == alone.text  # a free row is what it is alone
    short = results[-1][0]
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_a_bad_schema_is_refused_and_the_batch_goes_on(smollm_dir: Path, tmp_path: Path) -> None:
    from workers.serving.engine import GenRequest, ServingEngine

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    registry.register_base(name="smollm2", path=smollm_dir)
    engine = ServingEngine(registry.base_dir("smollm2"), registry, slots=2, max_rank=8)
    bad = GenRequest("Hi", max_tokens=4, schema={"type": "no-such-type"})
    good = GenRequest("Hi", max_tokens=4)
    out = _run(engine, [bad, good])
    engine.close()
    assert out[0][0].error is not None and "schema" in out[0][0].error
    assert out[0][0].kind == "invalid"
    assert out[1][0].error is None and out[1][0].completion_tokens == 4
