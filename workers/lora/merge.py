"""Merging: fold scaling·B·A into W0 for zero-overhead inference, and undo it.

``merge_state_dict`` is the pure form over state dicts (as torchtune does it): it never touches
its inputs. ``merge_lora``/``unmerge_lora`` act in place on a model's ``LoraLinear`` layers.
``merged_base_state_dict`` yields the plain model's state dict (no LoRA keys, no
``base_layer`` indirection), which a Hugging Face ``save_pretrained`` writes as an ordinary
model directory.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.lora.errors import MergeError
from workers.lora.inject import lora_modules
from workers.lora.memory import is_read_only


def merge_lora(model: nn.Module, *, safe: bool = True) -> int:
    """Merge every LoRA layer into its base weight; returns how many were merged.

    With ``safe`` (default) all merged weights are checked finite before any is changed.
    """
    layers = list(lora_modules(model).values())
    if not layers:
        raise MergeError("model has no LoRA layers to merge")
    for layer in layers:
        if is_read_only(layer.base_layer.weight):
            raise MergeError(
                "cannot merge into a read-only (shared) base weight; load a private copy of "
                "the base to merge"
            )
    if safe:
        for layer in layers:
            if not torch.isfinite(layer.merged_weight()).all():
                raise MergeError("merging would produce non-finite weights; base left unchanged")
    for layer in layers:
        layer.merge(safe=False)
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``; returns how many layers were unmerged."""
    layers = [m for m in lora_modules(model).values() if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_state_dict(
    base: dict[str, torch.Tensor],
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
) -> dict[str, torch.Tensor]:
    """Pure merge: W = W0 + scaling · B·A for every ``<path>.weight`` named in ``lora``.

    Args:
        base: plain model state dict (``<path>.weight`` keys).
        lora: module path → (A (r × in), B (out × r)).
        scaling: alpha/r (or alpha/sqrt(r)).

    Returns:
        A new dict; tensors not adapted are shared with ``base``, adapted ones are new.

    Raises:
        MergeError: a module missing from ``base``, a shape mismatch, or a non-finite result.
    """
    out = dict(base)
    for path, (a, b) in lora.items():
        key = f"{path}.weight"
        if key not in base:
            raise MergeError(f"base state dict has no {key!r}")
        w0 = base[key]
        if tuple(w0.shape) != (b.shape[0], a.shape[1]):
            raise MergeError(f"{key}: base shape {tuple(w0.shape)} does not fit B·A")
        merged = w0.to(torch.float32) + scaling * (b.to(torch.float32) @ a.to(torch.float32))
        if not torch.isfinite(merged).all():
            raise MergeError(f"{key}: merged weight is not finite")
        out[key] = merged.to(w0.dtype)
    return out


@torch.no_grad()
def merged_base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain base with every adapter merged in; the model is unchanged."""
    layers = lora_modules(model)
    plain: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key or key.endswith(".lora_magnitude_vector"):
            continue
        plain[key.replace(".base_layer.", ".")] = value
    lora = {}
    scalings = set()
    for path, layer in layers.items():
        if layer.merged:  # already folded into W0
            continue
        if layer.use_dora:  # the magnitude rescales every row: the layer merges itself
            plain[f"{path}.weight"] = layer.merged_weight()
            continue
        lora[path] = (layer.effective_a(), layer.lora_B.weight)
        scalings.add(layer.scaling)
    if not lora:
        return plain
    result = dict(plain)
    for scaling in scalings:
        subset = {p: ab for p, ab in lora.items() if layers[p].scaling == scaling}
        result = merge_state_dict(result, subset, scaling)
    return result
