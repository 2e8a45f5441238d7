"""Eval-gate rules (parse, judge) and the serving usage meter: pure, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from storage.gates import GateRuleError, evaluate, parse_rule, refusal
from workers.serving.metering import Periodic, UsageMeter


def test_rules_parse_to_one_canonical_text_or_say_what_is_accepted():
    assert parse_rule(" eval_loss <= 0.50 ").text == "eval_loss<=0.5"
    r = parse_rule("eval_loss<=current+2%")
    assert (r.relative, r.op, r.value, r.text) == (True, "<=", 2.0, "eval_loss<=current+2%")
    assert parse_rule("accuracy>=current-1.5%").text == "accuracy>=current-1.5%"
    assert parse_rule("eval_loss<current").value == 0.0
    for bad in ("eval_loss", "eval_loss<=", "loss<<1", "eval_loss<=current-2%",
                "accuracy>=current+1%", "eval_loss<=inf", "x" * 300):  # fmt: skip
        with pytest.raises(GateRuleError):
            parse_rule(bad)


def test_absolute_rules_judge_with_the_numbers_in_the_message():
    v = evaluate("production", ["eval_loss<=0.5"], ("a/x:2", {"eval_loss": 0.8123}), None)
    assert not v.passed
    assert v.failures() == ["eval_loss<=0.5: a/x:2 has eval_loss 0.8123 > 0.5"]
    assert "a/x:2 may not become @production: eval_loss<=0.5" in str(refusal(v))
    ok = evaluate("production", ["eval_loss<=0.5"], ("a/x:3", {"eval_loss": 0.5}), None)
    assert ok.passed and ok.results[0].value == 0.5
    assert evaluate("production", [], ("a/x:3", {}), None).passed  # no gate: anything passes


def test_missing_or_non_finite_metrics_fail_their_rule():
    for metrics in ({}, {"eval_loss": None}, {"eval_loss": float("nan")}, {"eval_loss": True}):
        v = evaluate("p", ["eval_loss<=0.5"], ("a/x:1", metrics), None)
        assert not v.passed and "no finite eval_loss" in v.failures()[0]


def test_relative_rules_compare_with_the_version_in_place():
    rule = ["eval_loss<=current+2%"]
    current = ("a/x:1", {"eval_loss": 0.5})
    assert evaluate("p", rule, ("a/x:2", {"eval_loss": 0.509}), current).passed  # 1.8 % worse
    worse = evaluate("p", rule, ("a/x:2", {"eval_loss": 0.52}), current)  # 4 % worse
    assert not worse.passed and worse.results[0].threshold == pytest.approx(0.51)
    assert "outside the bound 0.51 (a/x:1 has 0.5, tolerance 2%)" in worse.failures()[0]
    higher = ["accuracy>=current-1%"]
    acc = ("a/x:1", {"accuracy": 0.9})
    assert evaluate("p", higher, ("a/x:2", {"accuracy": 0.892}), acc).passed
    assert not evaluate("p", higher, ("a/x:2", {"accuracy": 0.89}), acc).passed
    first = evaluate("p", rule, ("a/x:1", {"eval_loss": 9.0}), None, first=True)
    assert first.passed and "first promotion ever" in first.results[0].message
    # an alias that pointed at a version before (it was deleted): nothing to compare is a no
    emptied = evaluate("p", rule, ("a/x:3", {"eval_loss": 9.0}), None)
    assert not emptied.passed and "points at no version" in emptied.failures()[0]
    unmeasured = evaluate("p", rule, ("a/x:3", {"eval_loss": 0.1}), ("a/x:2", {}))
    assert not unmeasured.passed and "has no eval_loss" in unmeasured.failures()[0]


def test_the_meter_buckets_by_minute_and_loses_nothing_when_a_flush_fails():
    now = [datetime(2026, 12, 3, 9, 0, 59, tzinfo=UTC)]
    meter = UsageMeter(clock=lambda: now[0])
    meter.add(namespace="a", model="a/x:1", prompt_tokens=5, completion_tokens=3)
    meter.add(namespace="a", model="a/x:1", prompt_tokens=7, completion_tokens=1)
    now[0] += timedelta(seconds=2)  # the next minute
    meter.add(namespace="", model="tiny", prompt_tokens=2, completion_tokens=2)
    assert meter.pending() == 3

    def down(_):  # type: ignore[no-untyped-def]
        raise ConnectionError("catalog down")

    with pytest.raises(ConnectionError):
        meter.flush(down)
    meter.add(namespace="a", model="a/x:1", prompt_tokens=1, completion_tokens=1)  # meanwhile
    written: list = []
    assert meter.flush(written.extend) == 3 + 1
    got = {(c.minute.minute, c.model): (c.requests, c.prompt_tokens, c.completion_tokens)
           for c in written}  # fmt: skip
    assert got == {(0, "a/x:1"): (2, 12, 4), (1, "tiny"): (1, 2, 2), (1, "a/x:1"): (1, 1, 1)}
    assert meter.pending() == 0 and meter.flush(written.extend) == 0


def test_periodic_survives_failures_and_runs_once_more_at_stop():
    calls: list[int] = []

    def task() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first tick fails")

    p = Periodic(task, 3600, "test")  # never ticks by itself here
    p.start()
    p.stop()
    assert calls == [1] and p.failures == 1
    p.stop()  # the final run again: it may fail, it never raises
    assert len(calls) == 2
