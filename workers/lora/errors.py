"""Errors of the LoRA method. Each names what the user can fix."""

from __future__ import annotations


class LoraError(ValueError):
    """Base class for LoRA errors a user can act on."""


class LoraConfigError(LoraError):
    """A LoRA hyperparameter is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TargetModulesError(LoraError):
    """No module (or an unknown module) matched ``target_modules``."""


class AdapterFormatError(LoraError):
    """An adapter directory is malformed, unsafe, or does not fit the base model."""


class MergeError(LoraError):
    """Merging would put non-finite values into the base weights, or the state is wrong."""
