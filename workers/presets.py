"""Shapes of well-known base models (configs only, no weights), for cost reports."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def preset_config(name: str) -> LlamaConfig:
    """A Llama config of a named shape.

    Raises:
        KeyError: unknown preset (the message lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return LlamaConfig(**PRESETS[name])
