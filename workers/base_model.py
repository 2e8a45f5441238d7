"""Load a base causal LM from a local Hugging Face directory: safetensors only, no remote code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from workers.errors import BaseModelError

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()


def check_base_dir(path: str | Path) -> Path:
    """Check that ``path`` is a local model directory with safetensors weights.

    Raises:
        BaseModelError: missing directory, no ``config.json``, or pickle-only weights.
    """
    p = Path(path)
    if not p.is_dir():
        raise BaseModelError(f"base model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise BaseModelError(f"{p} has no config.json: not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise BaseModelError(
                f"{p} holds only pickle weights (*.bin/*.pt), which lorafleet never loads; "
                "convert them to safetensors"
            )
        raise BaseModelError(f"{p} has no *.safetensors weights")
    return p


def load_base_config(path: str | Path) -> Any:
    """The model's ``config.json`` as a transformers config (no weights read)."""
    p = check_base_dir(path)
    try:
        return AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"cannot read {p / 'config.json'}: {exc}") from None


def load_tokenizer(path: str | Path) -> Any:
    """The base's tokenizer; a missing pad token falls back to EOS."""
    p = check_base_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load the tokenizer from {p}: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """Load model and tokenizer from a local directory, in eval mode with frozen weights.

    Raises:
        BaseModelError: see ``check_base_dir``; or weights that do not load.
    """
    p = check_base_dir(path)
    tokenizer = load_tokenizer(p)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise BaseModelError(f"cannot load the base model from {p}: {exc}") from None
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def meta_model(config: Any) -> PreTrainedModel:
    """Instantiate a model on the meta device: shapes without memory (for reports and sharding)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
