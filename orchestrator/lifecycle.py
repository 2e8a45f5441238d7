"""The job state machine: which transitions are legal (pure; persisted by the catalog).

queued → starting → running → succeeded | failed | cancelled
             ↘          ↘ retrying → starting (another attempt)
queued | starting | running | retrying → cancelled
"""

from __future__ import annotations

from typing import Literal

JobState = Literal["queued", "starting", "running", "retrying", "succeeded", "failed", "cancelled"]
STATES: tuple[JobState, ...] = (
    "queued", "starting", "running", "retrying", "succeeded", "failed", "cancelled",
)  # fmt: skip
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"starting", "running", "retrying"})

_ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"starting", "cancelled"}),
    "starting": frozenset({"running", "retrying", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "retrying", "cancelled"}),
    "retrying": frozenset({"starting", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransition(ValueError):
    """A job cannot move from its current state to the requested one."""

    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id} cannot go from {current} to {target}")
        self.job_id, self.current, self.target = job_id, current, target


def can_transition(current: str, target: str) -> bool:
    """Whether ``current → target`` is a legal move."""
    return target in _ALLOWED.get(current, frozenset())


def check_transition(job_id: str, current: str, target: str) -> None:
    """Raise ``IllegalTransition`` unless ``current → target`` is legal."""
    if not can_transition(current, target):
        raise IllegalTransition(job_id, current, target)
