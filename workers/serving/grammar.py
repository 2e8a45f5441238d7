"""Constrained decoding: a JSON schema compiled once, a token mask per row per step.

The library is llguidance (PyPI, no dependencies), chosen by measurement (``bench/grammar.py``,
SmolLM2's 49,152-token vocabulary, a 20-field schema, one thread): it compiles in 1.1 ms and
masks a step in 49 µs, where xgrammar 0.2.9 takes 7.0× and 4.1× as long (8.7× and 4.0× in a
first run) — and xgrammar would bring triton, a GPU compiler, into every install.

A ``GrammarCache`` belongs to one tokenizer (one base): it checks a schema (size, depth, the
library's own validation) and keeps each compiled grammar by its canonical text, so a schema
sent a thousand times compiles once. A ``RowGrammar`` is one row's state: ``mask`` sets every
token the grammar forbids next to −inf in that row's logits only (its batch-mates are not
touched), ``advance`` feeds the chosen token, ``finished`` says the document is complete (the
only token then allowed is EOS). Pure Python over the library; no HTTP, no Ray.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from workers import tool_calls
from workers.tool_calls import ToolPlan

MAX_SCHEMA_BYTES = 64 * 1024
MAX_GRAMMAR_BYTES = 256 * 1024  # a tool set's grammar: every function's schema together
MAX_DEPTH = 32
COMPILE_TIMEOUT_S = 5.0
CACHE_ENTRIES = 256
JSON_OBJECT = {"type": "object"}  # ``response_format: {"type": "json_object"}``
LARK = "lark:"  # cache keys of Lark grammars (JSON schema keys start with "{")


class GrammarError(ValueError):
    """A schema that cannot constrain decoding; the message names the part."""


def _depth(node: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(node, dict):
        return max((_depth(v, level + 1) for v in node.values()), default=level)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level)
    return level


def canonical_schema(schema: Any, part: str = "schema") -> str:
    """A schema's canonical JSON text (the cache key), after the checks every caller gets;
    errors name ``part``.

    Raises:
        GrammarError: not an object, over ``MAX_SCHEMA_BYTES`` or nested deeper than
            ``MAX_DEPTH``.
    """
    if not isinstance(schema, dict):
        raise GrammarError(f"{part}: a JSON object")
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{part}: {len(text.encode())} bytes; at most {MAX_SCHEMA_BYTES}")
    if _depth(schema) > MAX_DEPTH:
        raise GrammarError(f"{part}: nested deeper than {MAX_DEPTH} levels")
    return text


class GrammarCache:
    """Compiled grammars of one tokenizer, least recently used out beyond ``entries``.

    Args:
        tokenizer: a Hugging Face tokenizer (its EOS ends a finished document).
        vocab_size: the model's logits width (may exceed the tokenizer's: padded rows).
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, *,
                 entries: int = CACHE_ENTRIES) -> None:  # fmt: skip
        import llguidance.hf

        self.vocab_size = vocab_size or len(tokenizer)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)
        self.entries = entries
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self.hits = self.misses = 0

    def compile(self, schema: Any, *, timeout_s: float = COMPILE_TIMEOUT_S,
                part: str = "schema") -> str:  # fmt: skip
        """The grammar of a JSON schema, compiled at most once; errors name ``part``.

        Raises:
            GrammarError: see ``canonical_schema``; a schema the library rejects (its
                message), or one that does not compile within ``timeout_s``.
        """
        return self._compiled(canonical_schema(schema, part), part, timeout_s)

    def compile_lark(self, text: str, *, part: str = "grammar",
                     timeout_s: float = COMPILE_TIMEOUT_S) -> str:  # fmt: skip
        """A Lark grammar (llguidance's dialect), compiled at most once.

        Raises:
            GrammarError: over ``MAX_GRAMMAR_BYTES``, rejected, or too slow to compile.
        """
        if len(text.encode()) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"{part}: {len(text.encode())} bytes of grammar; at most "
                               f"{MAX_GRAMMAR_BYTES}")  # fmt: skip
        return self._compiled(LARK + text, part, timeout_s)

    def _compiled(self, key: str, part: str, timeout_s: float) -> str:
        with self._lock:
            found = self._grammars.get(key)
            if found is not None:
                self._grammars.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        future = self._pool.submit(self._build, key, part)
        try:
            grammar = future.result(timeout=timeout_s)
        except FutureTimeout:
            raise GrammarError(f"{part}: did not compile within {timeout_s:g} s") from None
        self._warm(grammar)
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > self.entries:
                self._grammars.popitem(last=False)
        return grammar

    def _build(self, key: str, part: str) -> str:
        import llguidance

        try:
            if key.startswith(LARK):
                grammar = llguidance.LLMatcher.grammar_from_lark(key.removeprefix(LARK))
            else:
                # compact JSON: a model may not pad an answer with whitespace until max_tokens
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    key, defaults={"whitespace_flexible": False}
                )
        except (ValueError, RuntimeError) as exc:
            raise GrammarError(f"{part}: {exc}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:  # the library's message ("" when the grammar is usable)
            raise GrammarError(f"{part}: {problem}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"{part}: {matcher.get_error()}")
        return grammar

    def _warm(self, grammar: str) -> None:
        """Compute a first mask here, not in the decode loop: the first mask of a free-text
        lexeme (``auto`` tools) builds the lexer's token sets over the whole vocabulary — 1.5
        s on SmolLM2's, once per process; then 0.6 ms. Not under the compile limit: it is
        the library's one-time cost, not the schema's."""
        RowGrammar(self, grammar).mask(torch.zeros(self.vocab_size))

    def ready(self, schema: Any, plan: ToolPlan | None = None) -> bool:
        """Whether the grammar of ``schema`` (or of ``plan``) is compiled already (a caller
        on an event loop may then build rows at once)."""
        try:
            if plan is not None:
                key = LARK + tool_calls.grammar(plan, schema)
            else:
                key = canonical_schema(schema)
        except GrammarError:
            return False
        with self._lock:
            return key in self._grammars

    def row(self, grammar: str) -> RowGrammar:
        """A fresh matcher for one row."""
        return RowGrammar(self, grammar)

    def compiled(self, schema: Any) -> Compiled:
        """``schema`` compiled (see ``compile``), as a decode row carries it."""
        return Compiled(self, self.compile(schema))

    def compiled_tools(self, plan: ToolPlan, schema: Any = None) -> Compiled:
        """The grammar of a tool plan (``tool_calls.grammar``), as a decode row carries it.

        Each function's parameter schema is compiled alone first (cached), so a bad one is
        named: ``tools[2].function.parameters: …``.

        Raises:
            GrammarError: naming the function or the response schema.
        """
        index = {f.name: i for i, f in enumerate(plan.tools)}
        for f in plan.functions:
            self.compile(json.loads(f.parameters),
                         part=f"tools[{index[f.name]}].function.parameters")  # fmt: skip
        if schema is not None:
            self.compile(schema)
        return Compiled(self, self.compile_lark(tool_calls.grammar(plan, schema), part="tools"))

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


class Compiled:
    """A compiled grammar and its cache: what a ``DecodeRow`` carries (each row that is
    decoded gets its own ``RowGrammar`` from it)."""

    def __init__(self, cache: GrammarCache, grammar: str) -> None:
        self.cache, self.grammar = cache, grammar

    def row(self) -> RowGrammar:
        return self.cache.row(self.grammar)


class RowGrammar:
    """One row's position in its grammar."""

    def __init__(self, cache: GrammarCache, grammar: str) -> None:
        import llguidance
        import llguidance.torch

        self._torch = llguidance.torch
        self.matcher = llguidance.LLMatcher(cache.tokenizer, grammar)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, cache.vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Forbid, in place, every token the grammar does not allow next (``logits``: this
        row's ``(vocab,)`` logits, float)."""
        self._torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        view = logits.view(1, -1)
        self._torch.apply_token_bitmask_inplace(view, self.bitmask.to(logits.device))

    def advance(self, token: int) -> None:
        """Feed the token chosen for this row (it was allowed: ``mask`` came first)."""
        self.matcher.consume_token(int(token))

    @property
    def finished(self) -> bool:
        """The document is complete and nothing may extend it (only EOS is allowed)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
