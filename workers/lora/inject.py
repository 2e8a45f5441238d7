"""Put LoRA layers into a model by module name, and read them back out.

Matching follows PEFT so configs mean the same thing in both: a list of names matches a module
whose path equals the name or ends with ``.name``; a string is a regular expression that must
match the full path; ``"all-linear"`` selects every ``nn.Linear`` except the output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from workers.lora.config import ALL_LINEAR, LoraConfig
from workers.lora.errors import TargetModulesError
from workers.lora.layer import LoraLinear

PEFT_PREFIX = "base_model.model."


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def linear_module_names(model: nn.Module) -> list[str]:
    """Paths of every ``nn.Linear`` (including already-wrapped bases) except the output head."""
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        # a wrapped layer (a LoraLinear, or a packed layer of several jobs) counts as its base
        if isinstance(getattr(module, "base_layer", None), nn.Linear) or (
            isinstance(module, nn.Linear)
            and module is not head
            and not name.endswith((".lora_A", ".lora_B", ".base_layer"))
        ):
            names.append(name)
    return names


def _leaf_names(paths: Iterable[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def match_target_modules(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Resolve ``target_modules`` to the module paths it selects.

    Raises:
        TargetModulesError: nothing matches, or a listed name matches no module; the message
            lists the linear module names that do exist.
    """
    candidates = linear_module_names(model)
    if targets == ALL_LINEAR:
        chosen = candidates
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    else:
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
        if unmatched and chosen:
            raise TargetModulesError(
                f"target module(s) {', '.join(unmatched)} not found; linear modules in this "
                f"model: {', '.join(_leaf_names(candidates))}"
            )
    if not chosen:
        raise TargetModulesError(
            f"target_modules {targets!r} matched no linear module; linear modules in this "
            f"model: {', '.join(_leaf_names(candidates))}"
        )
    return chosen


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject_lora(
    model: nn.Module,
    config: LoraConfig,
    *,
    module_paths: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Freeze every base parameter and wrap the targeted linear layers in ``LoraLinear``.

    Args:
        model: a causal LM (any ``nn.Module``); modified in place.
        config: the LoRA hyperparameters; ``target_modules`` chooses the layers unless
            ``module_paths`` is given (used when loading an adapter file, whose keys are exact).
        module_paths: exact module paths to wrap.
        dtype: dtype of the LoRA weights (default: float32 for half-precision bases).

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetModulesError: see ``match_target_modules``; or a path that is not a linear layer.
    """
    paths = (
        module_paths
        if module_paths is not None
        else match_target_modules(model, config.target_modules)
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise TargetModulesError(
                f"module {path!r} does not exist in this model; linear modules: "
                f"{', '.join(_leaf_names(linear_module_names(model)))}"
            ) from None
        if isinstance(module, LoraLinear):
            raise TargetModulesError(f"module {path!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TargetModulesError(f"module {path!r} is {type(module).__name__}, not nn.Linear")
        wrapped = LoraLinear(
            module,
            r=config.r,
            scaling=config.scaling,
            dropout=config.dropout,
            init=config.init,
            dtype=dtype,
            use_dora=config.use_dora,
            adalora=config.adalora is not None,
        )
        _set_submodule(model, path, wrapped)
    return list(paths)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Every ``LoraLinear`` in the model, by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The trainable LoRA parameters (A, B and DoRA's magnitude per module, in model order)."""
    params: list[torch.Tensor] = []
    for module in lora_modules(model).values():
        params += list(module.named_lora_tensors().values())
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's file keys: ``base_model.model.<path>.lora_{A,B}.weight`` (and
    DoRA's ``….lora_magnitude_vector``)."""
    out: dict[str, torch.Tensor] = {}
    for path, module in lora_modules(model).items():
        for suffix, tensor in module.named_lora_tensors().items():
            out[f"{PEFT_PREFIX}{path}.{suffix}"] = tensor.detach()
    return out


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoraLinear`` by its base layer (merged or not, as it stands)."""
    for path, module in list(lora_modules(model).items()):
        _set_submodule(model, path, module.base_layer)
    return model
