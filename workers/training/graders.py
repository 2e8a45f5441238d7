"""Graders in OpenAI's shapes: how a reinforcement job scores a sampled answer.

A grader is data, never code: ``string_check`` (eq, ne, like, ilike), ``text_similarity``
(fuzzy_match, bleu, rouge_1 … rouge_5, rouge_l), ``score_model`` (a model lorafleet serves —
the base, or an adapter of the catalog — asked a templated chat; the first number of its
greedy answer, clamped to ``range``) and ``multi`` (a weighted formula of named graders,
parsed into a small arithmetic tree — numbers, names, + − × ÷, parentheses, min, max, abs —
and evaluated without ``eval``). Templates reference ``{{sample.output_text}}`` and the
row's fields (``{{item.reference}}``); a template naming a field the rows lack is refused
before any training. ``parse_grader`` validates everything up front; scoring is pure but for
the model calls, which the caller supplies (``Ask``) and which are batched per model.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from workers.errors import TrainingError

GRADER_TYPES = ("string_check", "text_similarity", "score_model", "multi")
BASE_MODEL = "base"  # score_model's name for the job's own base, no adapter
# (model, conversations) → one greedy answer per conversation
Ask = Callable[[str, list[list[dict[str, str]]]], list[str]]
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
STRING_OPS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                      "rouge_5", "rouge_l")  # fmt: skip
_TEMPLATE = re.compile(r"\{\{\s*([a-z_]+)\.([A-Za-z0-9_]+)\s*\}\}")
MAX_DEPTH = 4  # multi inside multi, at most this deep
MAX_FORMULA = 500  # characters of a multi grader's formula (its parse tree stays shallow)


class GraderError(TrainingError):
    """A grader that cannot be used, naming the part (``grader.graders.a.operation``)."""


def template_fields(template: str) -> set[str]:
    """The row fields a template reads (``{{item.x}}`` → ``x``)."""
    return {f for scope, f in _TEMPLATE.findall(template) if scope == "item"}


def render(template: str, output_text: str, item: dict[str, Any]) -> str:
    """A template with ``{{sample.output_text}}`` and ``{{item.<field>}}`` filled in."""

    def fill(m: re.Match[str]) -> str:
        scope, name = m.group(1), m.group(2)
        if scope == "sample":
            return output_text
        value = item.get(name, "")
        return value if isinstance(value, str) else str(value)

    return _TEMPLATE.sub(fill, template)


def _like(text: str, pattern: str, *, fold: bool) -> bool:
    """SQL LIKE: % any run, _ one character (OpenAI's like/ilike)."""
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, text, flags=re.DOTALL | (re.IGNORECASE if fold else 0)) is not None


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def rouge_n(candidate: str, reference: str, n: int) -> float:
    """ROUGE-N F1 over word n-grams."""
    c, r = _ngrams(_words(candidate), n), _ngrams(_words(reference), n)
    overlap = sum((c & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common word subsequence."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (geometric mean of 1–4-gram precisions, add-one smoothing above
    unigrams, brevity penalty), in [0, 1]."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        cn, rn = _ngrams(c, n), _ngrams(r, n)
        total = sum(cn.values())
        hits = sum((cn & rn).values())
        if n == 1:
            if not hits:
                return 0.0
            logs.append(math.log(hits / total))
        else:
            logs.append(math.log((hits + 1) / (total + 1)))
    penalty = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return penalty * math.exp(sum(logs) / max_n)


def fuzzy_match(candidate: str, reference: str) -> float:
    """Similarity ratio of the two strings (difflib's, as rapidfuzz's ratio / 100)."""
    return difflib.SequenceMatcher(None, candidate, reference).ratio()


def _similarity(metric: str) -> Callable[[str, str], float]:
    if metric == "fuzzy_match":
        return fuzzy_match
    if metric == "bleu":
        return bleu
    if metric == "rouge_l":
        return rouge_l
    n = int(metric.rsplit("_", 1)[1])
    return lambda a, b: rouge_n(a, b, n)


# -- formulas of multi: parsed, checked, evaluated without eval -----------------------------
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b if b else 0.0}  # fmt: skip
_FUNCS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}


def _check_formula(node: ast.AST, names: set[str], where: str) -> None:
    if isinstance(node, ast.Expression):
        return _check_formula(node.body, names, where)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return None
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise GraderError(f"{where}: the formula names {node.id!r}, which is not one of "
                              f"the graders ({', '.join(sorted(names))})")  # fmt: skip
        return None
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_formula(node.left, names, where)
        return _check_formula(node.right, names, where)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return _check_formula(node.operand, names, where)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords and node.args):  # fmt: skip
        for arg in node.args:
            _check_formula(arg, names, where)
        return None
    raise GraderError(f"{where}: only numbers, grader names, + - * /, parentheses and "
                      "min/max/abs may appear in the formula")  # fmt: skip


def _evaluate(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values)
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # _check_formula let only numbers through
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return float(_BINARY[type(node.op)](_evaluate(node.left, values),
                                            _evaluate(node.right, values)))  # fmt: skip
    if isinstance(node, ast.UnaryOp):
        v = _evaluate(node.operand, values)
        return -v if isinstance(node.op, ast.USub) else v
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(_FUNCS[node.func.id](*(_evaluate(a, values) for a in node.args)))


ScoreMany = Callable[[list[str], list[dict[str, Any]], Ask | None], list[float]]


@dataclass(frozen=True)
class Grader:
    """A parsed grader: ``score_many(texts, items, ask)`` → one float reward per answer.

    Attributes:
        fields: the row fields its templates read.
        models: the models its ``score_model`` parts ask (``BASE_MODEL`` or adapter refs).
    """

    spec: dict[str, Any]
    score_many_fn: ScoreMany
    fields: frozenset[str]
    models: frozenset[str] = frozenset()

    def score_many(self, texts: list[str], items: list[dict[str, Any]],
                   ask: Ask | None = None) -> list[float]:  # fmt: skip
        return [float(v) for v in self.score_many_fn(texts, items, ask)]

    def score(self, output_text: str, item: dict[str, Any], ask: Ask | None = None) -> float:
        return self.score_many([output_text], [item], ask)[0]


def _each(fn: Callable[[str, dict[str, Any]], float]) -> ScoreMany:
    return lambda texts, items, _ask: [fn(t, i) for t, i in zip(texts, items, strict=True)]


def _parse_score_model(spec: dict[str, Any], where: str) -> Grader:
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise GraderError(f"{where}.model: name the model to ask: {BASE_MODEL!r} (the job's "
                          "base) or an adapter, namespace/name[:VERSION|@ALIAS]")  # fmt: skip
    messages = spec.get("input")
    if not isinstance(messages, list) or not messages:
        raise GraderError(f"{where}.input: must be a non-empty list of messages")
    fields: set[str] = set()
    for k, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):  # fmt: skip
            raise GraderError(f"{where}.input[{k}]: must be {{role: system|user|assistant, "
                              "content: a template}")  # fmt: skip
        fields |= template_fields(m["content"])
    bounds = spec.get("range", [0, 1])
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool)
                       and math.isfinite(v) for v in bounds)
            or bounds[0] >= bounds[1]):  # fmt: skip
        raise GraderError(f"{where}.range: must be [low, high] with low < high")
    lo, hi = bounds

    def score_many(texts: list[str], items: list[dict[str, Any]], ask: Ask | None) -> list[float]:
        if ask is None:
            raise GraderError(f"{where}: a score_model grader needs a model to ask")
        chats = [[{"role": m["role"], "content": render(m["content"], t, i)} for m in messages]
                 for t, i in zip(texts, items, strict=True)]  # fmt: skip
        out = []
        for answer in ask(model, chats):
            found = _NUMBER.search(answer)
            value = float(found.group()) if found else float(lo)
            out.append(min(float(hi), max(float(lo), value)))
        return out

    return Grader(spec, score_many, frozenset(fields), frozenset({model}))


def _str(spec: dict[str, Any], key: str, where: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise GraderError(f"{where}.{key}: must be a non-empty string (a template)")
    return value


def parse_grader(spec: Any, where: str = "grader", depth: int = 0) -> Grader:
    """Validate a grader and build its scorer.

    Raises:
        GraderError: an unknown type, operation or metric, a missing part, a bad formula,
            naming the part.
    """
    if not isinstance(spec, dict):
        raise GraderError(f"{where}: must be an object with a type")
    kind = spec.get("type")
    if kind not in GRADER_TYPES:
        raise GraderError(f"{where}.type: unknown grader type {kind!r}; use one of "
                          f"{', '.join(GRADER_TYPES)}")  # fmt: skip
    if kind == "multi":
        if depth >= MAX_DEPTH:
            raise GraderError(f"{where}: multi graders nest at most {MAX_DEPTH} deep")
        subs = spec.get("graders")
        if not isinstance(subs, dict) or not subs:
            raise GraderError(f"{where}.graders: must map names to graders")
        parsed = {}
        for name, sub in subs.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise GraderError(f"{where}.graders: {name!r} is not a usable name (letters, "
                                  "digits, _)")  # fmt: skip
            parsed[name] = parse_grader(sub, f"{where}.graders.{name}", depth + 1)
        formula = _str(spec, "calculate_output", where)
        if len(formula) > MAX_FORMULA:
            raise GraderError(f"{where}.calculate_output: longer than {MAX_FORMULA} characters")
        try:
            tree = ast.parse(formula, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise GraderError(f"{where}.calculate_output: not a formula: {formula!r}") from None
        _check_formula(tree, set(parsed), f"{where}.calculate_output")

        def score_multi(texts: list[str], items: list[dict[str, Any]],
                        ask: Ask | None) -> list[float]:  # fmt: skip
            columns = {n: g.score_many(texts, items, ask) for n, g in parsed.items()}
            return [_evaluate(tree, {n: col[k] for n, col in columns.items()})
                    for k in range(len(texts))]  # fmt: skip

        fields = frozenset().union(*(g.fields for g in parsed.values()))
        models = frozenset().union(*(g.models for g in parsed.values()))
        return Grader(spec, score_multi, fields, models)
    if kind == "score_model":
        return _parse_score_model(spec, where)
    source, reference = _str(spec, "input", where), _str(spec, "reference", where)
    fields = frozenset(template_fields(source) | template_fields(reference))
    if kind == "string_check":
        op = spec.get("operation")
        if op not in STRING_OPS:
            raise GraderError(f"{where}.operation: unknown operation {op!r}; use one of "
                              f"{', '.join(STRING_OPS)}")  # fmt: skip

        def score_string(text: str, item: dict[str, Any]) -> float:
            a, b = render(source, text, item), render(reference, text, item)
            if op == "eq":
                return float(a == b)
            if op == "ne":
                return float(a != b)
            return float(_like(a, b, fold=op == "ilike"))

        return Grader(spec, _each(score_string), fields)
    metric = spec.get("evaluation_metric")
    if metric not in SIMILARITY_METRICS:
        raise GraderError(f"{where}.evaluation_metric: unknown metric {metric!r}; use one of "
                          f"{', '.join(SIMILARITY_METRICS)}")  # fmt: skip
    similarity = _similarity(metric)

    def score_similarity(text: str, item: dict[str, Any]) -> float:
        return similarity(render(source, text, item), render(reference, text, item))

    return Grader(spec, _each(score_similarity), fields)


def check_fields(grader: Grader, rows: Iterable[dict[str, Any]], name: str) -> None:
    """Every field the grader's templates read is in every row.

    Raises:
        GraderError: ``name:line: the grader reads item.x, which this row lacks``.
    """
    for line, row in enumerate(rows, start=1):
        missing = sorted(f for f in grader.fields if f not in row)
        if missing:
            raise GraderError(f"{name}:{line}: the grader reads item.{missing[0]}, which this "
                              "row lacks")  # fmt: skip
