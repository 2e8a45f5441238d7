"""Grammar masks on synthetic logits: whatever the logits, a constrained row decodes JSON that
conforms to its schema; a mask touches its own row only; schemas compile once; bad schemas
are refused naming the part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tests.helpers import masked_decode  # noqa: E402
from workers.serving.grammar import (  # noqa: E402
    JSON_OBJECT,
    MAX_DEPTH,
    GrammarCache,
    GrammarError,
)

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["ok", "color", "tags"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_base_dir: Path) -> GrammarCache:
    from workers.base_model import load_tokenizer

    return GrammarCache(load_tokenizer(tiny_base_dir))


@pytest.mark.parametrize("seed", range(8))
def test_masked_rows_decode_conforming_json(cache: GrammarCache, seed: int) -> None:
    text = masked_decode(cache, cache.compile(SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode_is_any_object(cache: GrammarCache) -> None:
    grammar = cache.compile(JSON_OBJECT)
    row = cache.row(grammar)
    logits = torch.zeros(cache.vocab_size)
    row.mask(logits)
    allowed = (logits > float("-inf")).nonzero().flatten().tolist()
    first = {bytes(cache.tokenizer.decode_bytes([t])).decode(errors="replace").lstrip()[:1]
             for t in allowed}  # fmt: skip
    assert first <= {"{", ""}  # an object starts (whitespace may come first)


def test_a_mask_touches_its_own_row_only(cache: GrammarCache) -> None:
    logits = torch.randn(2, cache.vocab_size)
    before = logits[1].clone()
    cache.row(cache.compile(SCHEMA)).mask(logits[0])
    assert torch.equal(logits[1], before)
    assert bool((logits[0] == float("-inf")).any())


def test_schemas_compile_once(cache: GrammarCache) -> None:
    hits = cache.hits
    a = cache.compile({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = cache.compile({"properties": {"x": {"type": "integer"}}, "type": "object"})  # same
    assert a == b and cache.hits == hits + 1


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "foo"}, "foo"),
    ("not an object", "a JSON object"),
    ({"type": "object", "description": "x" * 70_000}, "bytes"),
])  # fmt: skip
def test_bad_schemas_are_named(cache: GrammarCache, schema: Any, words: str) -> None:
    with pytest.raises(GrammarError, match=words):
        cache.compile(schema)


def test_too_deep_is_refused(cache: GrammarCache) -> None:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_DEPTH + 2):
        node = {"type": "array", "items": node}
    with pytest.raises(GrammarError, match="deeper"):
        cache.compile(node)
