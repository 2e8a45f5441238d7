"""Export base + adapter as a plain Hugging Face model directory with no LoRA modules."""

from __future__ import annotations

import shutil
from pathlib import Path

from workers.base_model import load_base
from workers.lora import load_adapter, merged_base_state_dict, remove_lora

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def export_merged(*, base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the adapter into the base weights and save an ordinary model directory.

    The merged weights are computed out of place (``merged_base_state_dict``), then the LoRA
    wrappers are removed so the saved model has exactly the base's modules and keys.
    """
    model, _ = load_base(base_dir)
    load_adapter(model, adapter_dir)
    state = merged_base_state_dict(model)
    remove_lora(model)
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    return out
