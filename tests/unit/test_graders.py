"""Graders in OpenAI's shapes: scores, formulas without eval, and errors naming the part."""

from __future__ import annotations

import pytest

from workers.training.graders import (
    GraderError,
    bleu,
    check_fields,
    fuzzy_match,
    parse_grader,
    rouge_l,
    rouge_n,
)

OUT = "{{sample.output_text}}"


def test_string_check_operations():
    def score(op: str, text: str, ref: str) -> float:
        g = parse_grader({"type": "string_check", "input": OUT, "reference": "{{item.ref}}",
                          "operation": op})  # fmt: skip
        return g.score(text, {"ref": ref})

    assert score("eq", "Paris", "Paris") == 1.0 and score("eq", "paris", "Paris") == 0.0
    assert score("ne", "Rome", "Paris") == 1.0
    assert score("like", "the answer is 42.", "%42%") == 1.0
    assert score("like", "THE ANSWER IS 42", "the%") == 0.0
    assert score("ilike", "THE ANSWER IS 42", "the%") == 1.0
    assert score("like", "a.c", "a_c") == 1.0 and score("like", "a.c", "a.d") == 0.0


def test_text_similarity_metrics():
    assert fuzzy_match("kitten", "kitten") == 1.0 and 0 < fuzzy_match("kitten", "sitting") < 1
    assert rouge_n("the cat sat", "the cat sat", 1) == 1.0
    assert rouge_n("the cat sat", "a dog ran", 1) == 0.0
    assert rouge_n("the cat sat on", "the cat lay on", 2) == pytest.approx(1 / 3)
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert bleu("the quick brown fox jumps", "the quick brown fox jumps") == pytest.approx(1.0)
    assert bleu("", "the fox") == 0.0 and 0 < bleu("the quick fox", "the quick brown fox") < 1
    g = parse_grader({"type": "text_similarity", "input": OUT, "reference": "{{item.answer}}",
                      "evaluation_metric": "rouge_1"})  # fmt: skip
    assert g.score("the cat sat", {"answer": "the cat sat"}) == 1.0


def test_multi_is_a_weighted_formula_evaluated_without_eval():
    g = parse_grader({
        "type": "multi",
        "graders": {
            "exact": {"type": "string_check", "input": OUT, "reference": "{{item.ref}}",
                      "operation": "eq"},
            "close": {"type": "text_similarity", "input": OUT, "reference": "{{item.ref}}",
                      "evaluation_metric": "fuzzy_match"},
        },
        "calculate_output": "0.5 * exact + 0.5 * max(close, 0.2) - abs(-0.1)",
    })  # fmt: skip
    assert g.score("abc", {"ref": "abc"}) == pytest.approx(0.9)
    assert g.fields == frozenset({"ref"})
    for formula, part in [("__import__('os')", "only numbers"), ("exact ** 2", "only numbers"),
                          ("exact + nope", "'nope'"), ("exact +", "not a formula")]:  # fmt: skip
        with pytest.raises(GraderError, match=part):
            parse_grader({"type": "multi", "graders": {"exact": {
                "type": "string_check", "input": OUT, "reference": "x", "operation": "eq"}},
                "calculate_output": formula})  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "python", "source": "x"}, "grader.type: unknown grader type 'python'"),
    ({"type": "string_check", "input": OUT, "reference": "a", "operation": "regex"},
     "grader.operation: unknown operation 'regex'"),
    ({"type": "text_similarity", "input": OUT, "reference": "a", "evaluation_metric": "meteor"},
     "grader.evaluation_metric: unknown metric 'meteor'"),
    ({"type": "string_check", "reference": "a", "operation": "eq"}, "grader.input: must be"),
    ({"type": "multi", "graders": {"a": {"type": "nope"}}, "calculate_output": "a"},
     "grader.graders.a.type: unknown grader type"),
])  # fmt: skip
def test_bad_graders_name_the_part(spec, message):
    with pytest.raises(GraderError, match=message.replace("(", r"\(")):
        parse_grader(spec)


def test_a_template_field_the_rows_lack_names_file_and_line():
    g = parse_grader({"type": "string_check", "input": OUT, "reference": "{{item.answer}}",
                      "operation": "eq"})  # fmt: skip
    check_fields(g, [{"answer": "a"}], "train.jsonl")
    with pytest.raises(GraderError, match=r"train.jsonl:2: the grader reads item.answer"):
        check_fields(g, [{"answer": "a"}, {"reference": "b"}], "train.jsonl")


def test_score_model_parses_the_first_number_and_clamps_it_to_its_range():
    g = parse_grader({"type": "score_model", "model": "team/judge:2", "range": [0, 10],
                      "input": [{"role": "system", "content": "Rate 0-10."},
                                {"role": "user", "content": "{{sample.output_text}} vs "
                                 "{{item.answer}}"}]})  # fmt: skip
    assert g.models == frozenset({"team/judge:2"}) and g.fields == frozenset({"answer"})
    seen = []

    def ask(model, chats):  # type: ignore[no-untyped-def]
        seen.append((model, chats))
        return ["I'd say 7/10", "no idea", "15!", "-3"]

    scores = g.score_many(["a", "b", "c", "d"], [{"answer": "x"}] * 4, ask)
    assert scores == [7.0, 0.0, 10.0, 0.0]
    assert len(seen) == 1 and seen[0][1][0][1] == {"role": "user", "content": "a vs x"}
    with pytest.raises(GraderError, match="needs a model to ask"):
        g.score("a", {"answer": "x"})
    with pytest.raises(GraderError, match=r"grader.input\[0\]"):
        parse_grader({"type": "score_model", "model": "base", "input": [{"role": "tool"}]})
