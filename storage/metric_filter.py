"""Filters over adapter metrics, as typed on the command line: ``eval_loss<0.5``."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.errors import StorageError

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "=": operator.eq,
}
_FILTER = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(<=|>=|<|>|=)\s*([-+0-9.eE]+)\s*$")


class MetricFilterError(StorageError, ValueError):
    """A metric filter is not ``name<op>number``."""


@dataclass(frozen=True)
class MetricFilter:
    name: str
    op: str
    value: float

    def matches(self, metrics: dict[str, Any]) -> bool:
        """True when the metric exists, is a number, and satisfies the comparison."""
        v = metrics.get(self.name)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        return OPS[self.op](float(v), self.value)


def parse_metric_filter(text: str) -> MetricFilter:
    """Parse ``name<0.5``, ``accuracy>=0.9`` …

    Raises:
        MetricFilterError: anything else.
    """
    m = _FILTER.fullmatch(text)
    if m is None:
        raise MetricFilterError(f"invalid metric filter {text!r}: use e.g. eval_loss<0.5")
    try:
        value = float(m[3])
    except ValueError:
        raise MetricFilterError(f"invalid number in metric filter {text!r}") from None
    return MetricFilter(m[1], m[2], value)
