"""The REST API's error value: an HTTP status, a message and the offending field.

Only the HTTP layer (the ``orchestrator.api`` package) raises it; below that, errors are
domain exceptions that this layer maps to a status.
"""

from __future__ import annotations


class ApiError(Exception):
    """Answered as ``{"error": {"message", "field"}}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
