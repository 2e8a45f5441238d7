"""Turn a GGUF file (llama.cpp's format) into a plain Hugging Face directory lorafleet serves.

transformers reads GGUF through the ``gguf`` package and de-quantizes it; the weights are
then copied into a freshly built model of the same config (so nothing of the GGUF loader's
state rides along) and saved as safetensors with the tokenizer and its chat template. GGUF is
a tensor container, not pickle: no code runs on load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from workers.errors import BaseModelError

log = logging.getLogger(__name__)


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: torch.dtype) -> Path:
    """Write ``gguf_file`` as a Hugging Face model directory at ``out_dir``.

    Args:
        dtype: the saved weights' dtype (bf16 halves the bytes of an fp32 save).

    Raises:
        BaseModelError: the file is missing, or not a model transformers can read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_file)
    if not src.is_file():
        raise BaseModelError(f"GGUF file {src} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                      dtype=torch.float32)  # fmt: skip
    except (OSError, ValueError, ImportError) as exc:
        raise BaseModelError(f"cannot read {src} as a GGUF model: {exc}") from None
    config = loaded.config
    # the weights are saved de-quantized: the GGUF loading options must not travel with them
    # (transformers would then refuse the plain directory as "a GGUF checkpoint")
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise BaseModelError(f"{src}: weights do not fit the model they describe")
    fresh.to(dtype)
    out = Path(out_dir)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("imported %s into %s", src.name, out)
    return out
