"""Eval gates: the rules a version must pass before an alias may point at it.

Two forms, typed as on the command line (``lorafleet adapters gate NS/NAME ALIAS --require``):

- absolute, ``eval_loss<=0.5``: the version's metric compared with a number (the same parse
  as ``adapters list --metric``);
- relative, ``eval_loss<=current+2%`` (lower is better) or ``accuracy>=current-1%`` (higher
  is better): the version's metric against the metric of the version the alias points at now,
  with a tolerance in percent of that value. With nothing in place, a relative rule fails —
  except at the alias's first promotion ever, where it passes, says so, and the promotion is
  recorded as such (so deleting the version in place cannot open the gate).

A metric the version lacks, or that is not a finite number, fails its rule: a gate that could
not be checked must not let a version through. Everything here is pure; the catalog stores
the rule text and calls ``evaluate`` in the transaction that moves the alias.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from storage.errors import StorageError
from storage.metric_filter import OPS, MetricFilterError, parse_metric_filter

_RELATIVE = re.compile(
    r"^\s*([A-Za-z0-9_.-]+)\s*(<=|>=|<|>)\s*current\s*(?:([+-])\s*([0-9.]+)\s*%)?\s*$"
)
MAX_RULE_CHARS = 200


class GateRuleError(StorageError, ValueError):
    """A gate rule is neither ``metric<op>number`` nor ``metric<op>current±P%``."""


class GateRefused(StorageError):
    """A version failed an alias's gate (the message has the numbers)."""

    def __init__(self, message: str, verdict: GateVerdict) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True)
class GateRule:
    """One parsed rule; ``relative`` rules compare with the alias's current version."""

    text: str
    metric: str
    op: str
    value: float = 0.0  # the bound (absolute), or the tolerance in percent (relative)
    relative: bool = False

    def threshold(self, current: float | None) -> float | None:
        """The bound a candidate's metric is compared with (None: nothing to compare)."""
        if not self.relative:
            return self.value
        if current is None:
            return None
        # "worse by at most P %": lower-is-better rules (< <=) allow current·(1+P), higher-
        # is-better ones (> >=) current·(1−P); abs() keeps the direction for negative metrics
        slack = abs(current) * self.value / 100.0
        return current + slack if self.op in ("<", "<=") else current - slack


def parse_rule(text: str) -> GateRule:
    """Parse one rule (see the module docstring).

    Raises:
        GateRuleError: anything else, with an example of each form.
    """
    if len(text) > MAX_RULE_CHARS:
        raise GateRuleError(f"a gate rule has at most {MAX_RULE_CHARS} characters")
    m = _RELATIVE.fullmatch(text)
    if m is not None:
        name, op, sign, pct = m[1], m[2], m[3], m[4]
        try:
            tolerance = float(pct) if pct is not None else 0.0
        except ValueError:
            raise GateRuleError(f"invalid percentage in gate rule {text!r}") from None
        lower_is_better = op in ("<", "<=")
        if pct is not None and (sign == "+") != lower_is_better:
            better = "current+P%" if lower_is_better else "current-P%"
            raise GateRuleError(
                f"gate rule {text!r}: with {op} the tolerance allows a worse value, so write "
                f"{name}{op}{better}"
            )
        canonical = f"{name}{op}current" + (f"{sign}{tolerance:g}%" if pct is not None else "")
        return GateRule(canonical, name, op, tolerance, relative=True)
    try:
        f = parse_metric_filter(text)
    except MetricFilterError:
        raise GateRuleError(
            f"invalid gate rule {text!r}: use e.g. eval_loss<=0.5 or eval_loss<=current+2%"
        ) from None
    if not math.isfinite(f.value):
        raise GateRuleError(f"gate rule {text!r}: the bound must be a finite number")
    return GateRule(f"{f.name}{f.op}{f.value:g}", f.name, f.op, f.value)


@dataclass(frozen=True)
class RuleResult:
    """How one rule judged a candidate; ``message`` says it with the numbers."""

    rule: str
    passed: bool
    value: float | None
    threshold: float | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "value": self.value,
                "threshold": self.threshold, "message": self.message}  # fmt: skip


@dataclass(frozen=True)
class GateVerdict:
    """Every rule's result for one candidate and alias; ``passed`` when all passed."""

    alias: str
    candidate: str
    current: str | None
    results: tuple[RuleResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [r.message for r in self.results if not r.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "candidate": self.candidate, "current": self.current,
                "passed": self.passed, "results": [r.as_dict() for r in self.results]}  # fmt: skip


def _number(metrics: dict[str, Any], name: str) -> float | None:
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def judge(
    rule: GateRule,
    candidate: tuple[str, dict[str, Any]],
    current: tuple[str, dict[str, Any]] | None,
    *,
    first: bool = False,
) -> RuleResult:
    """One rule against a candidate ``(ref, metrics)`` and the alias's current version
    (``first``: the alias has never pointed at any version)."""
    ref, metrics = candidate
    value = _number(metrics, rule.metric)
    if value is None:
        msg = f"{rule.text}: {ref} has no finite {rule.metric} metric"
        return RuleResult(rule.text, False, None, None, msg)
    if rule.relative:
        if current is None:
            if first:
                msg = f"{rule.text}: nothing to compare with (the alias's first promotion ever)"
                return RuleResult(rule.text, True, value, None, msg)
            msg = (f"{rule.text}: the alias points at no version to compare with (it did "
                   "before: promote through an absolute rule, or force as an admin)")  # fmt: skip
            return RuleResult(rule.text, False, value, None, msg)
        cur_ref, cur_metrics = current
        cur = _number(cur_metrics, rule.metric)
        if cur is None:  # a gate that cannot compare must not let a version through
            msg = f"{rule.text}: {cur_ref}, in place, has no {rule.metric} to compare with"
            return RuleResult(rule.text, False, value, None, msg)
        bound = rule.threshold(cur)
        assert bound is not None
        ok = OPS[rule.op](value, bound)
        verb = "within" if ok else "outside"
        msg = (f"{rule.text}: {ref} has {rule.metric} {value:.6g}, {verb} the bound {bound:.6g} "
               f"({cur_ref} has {cur:.6g}, tolerance {rule.value:g}%)")  # fmt: skip
        return RuleResult(rule.text, ok, value, bound, msg)
    ok = OPS[rule.op](value, rule.value)
    shown = rule.op if ok else {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "=": "!="}[rule.op]
    msg = f"{rule.text}: {ref} has {rule.metric} {value:.6g} {shown} {rule.value:g}"
    return RuleResult(rule.text, ok, value, rule.value, msg)


def evaluate(
    alias: str,
    rules: list[str],
    candidate: tuple[str, dict[str, Any]],
    current: tuple[str, dict[str, Any]] | None,
    *,
    first: bool = False,
) -> GateVerdict:
    """Judge a candidate against every stored rule of ``alias`` (no rules: it passes);
    ``first``: the alias has never pointed at any version."""
    results = tuple(judge(parse_rule(r), candidate, current, first=first) for r in rules)
    return GateVerdict(alias, candidate[0], current[0] if current else None, results)


def refusal(verdict: GateVerdict) -> GateRefused:
    """The error a refused promotion raises: every failed rule with its numbers."""
    failed = "; ".join(verdict.failures())
    return GateRefused(
        f"{verdict.candidate} may not become @{verdict.alias}: {failed} "
        "(an admin may pass the gate with --force; it is recorded)",
        verdict,
    )
