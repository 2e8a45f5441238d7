"""Errors a user can act on, raised by the worker code (bases, datasets, training)."""

from __future__ import annotations


class WorkerError(ValueError):
    """Base class for user-facing worker errors; the CLI prints the message on one line."""


class BaseModelError(WorkerError):
    """A base model directory is missing, incomplete or unsafe to load."""


class DatasetError(WorkerError):
    """A dataset file is missing or a row is malformed (the message names the line)."""


class TrainingError(WorkerError):
    """Training cannot start or diverged (e.g. a non-finite loss)."""
