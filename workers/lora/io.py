"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.lora_A.weight`` (shape r × in) and
``…lora_B.weight`` (shape out × r), exactly what ``peft.PeftModel.save_pretrained`` writes, so
PEFT, vLLM and LoRAX read our adapters and we read theirs. Only safetensors is ever read: a
directory holding just PEFT's legacy pickle ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workers.lora.config import LoraConfig
from workers.lora.errors import AdapterFormatError, LoraConfigError
from workers.lora.inject import PEFT_PREFIX, inject_lora, lora_modules, lora_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_"
    r"(?:(?P<which>[AB])(?:\.weight)?|(?P<m>magnitude_vector)|(?P<e>E))$"
)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(
    model: nn.Module,
    config: LoraConfig,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's LoRA weights and config in PEFT's format.

    Files are written to temporary names and renamed into place, so a crash never leaves a
    half-written adapter behind under the final names.

    Returns:
        The adapter directory.
    """
    return save_adapter_state(lora_state_dict(model), config, out_dir,
                              base_model_name_or_path=base_model_name_or_path)  # fmt: skip


def save_adapter_state(
    weights: dict[str, torch.Tensor],
    config: LoraConfig,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write LoRA weights (PEFT's keys) and config in PEFT's format, atomically per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    if not state:
        raise AdapterFormatError("model has no LoRA layers to save")
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_NAME}.")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    cfg = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path)
    _atomic_write_bytes(out / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return out


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> LoraConfig:
    """Parse and validate ``adapter_config.json``.

    Raises:
        AdapterFormatError: missing or malformed file, or an unsupported PEFT feature.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise AdapterFormatError(f"adapter directory {adapter_dir} does not exist")
    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing: not a PEFT adapter directory")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    try:
        return LoraConfig.from_peft_dict(data)
    except LoraConfigError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None


def read_adapter_weights(adapter_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never a pickle file).

    Raises:
        AdapterFormatError: no safetensors file (a pickle ``.bin`` is refused with its own
            message), or an unreadable file.
    """
    adapter = Path(adapter_dir)
    weights = adapter / WEIGHTS_NAME
    if not weights.is_file():
        if (adapter / PICKLE_WEIGHTS_NAME).exists():
            raise AdapterFormatError(
                f"{adapter} holds {PICKLE_WEIGHTS_NAME} (pickle), which lorafleet never loads; "
                "re-save it with safetensors (PeftModel.save_pretrained(..., "
                "safe_serialization=True))"
            )
        raise AdapterFormatError(f"{weights} is missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AdapterFormatError(f"{weights} is not a readable safetensors file: {exc}") from None


def parse_adapter_keys(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module path: ``{path: {"A": tensor, "B": tensor}}`` (and ``"M"``, DoRA's
    magnitude vector, where the adapter has one).

    Raises:
        AdapterFormatError: a key that is not a LoRA A/B weight or magnitude, or a module missing
            one of A/B.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {key!r} in adapter (expected "
                f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')"
            )
        modules.setdefault(m["path"], {})[m["which"] or ("M" if m["m"] else "E")] = tensor
    for path, pair in modules.items():
        if not {"A", "B"} <= set(pair):
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterFormatError(f"module {path!r} has no {missing}.weight in the adapter")
    return modules


def check_adapter_shapes(
    model: nn.Module, config: LoraConfig, modules: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Check that every adapter module exists in the model as a linear layer of the right shape.

    Raises:
        AdapterFormatError: naming the module, the model's shape and the adapter's shape.
    """
    for path, pair in modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AdapterFormatError(
                f"adapter targets module {path!r}, which this base model does not have: "
                "the adapter was made for another base"
            ) from None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            raise AdapterFormatError(f"adapter targets {path!r}, which is not a linear layer")
        a, b = pair["A"], pair["B"]
        want_a = (config.r, base.in_features)
        want_b = (base.out_features, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterFormatError(
                f"adapter for another base shape at {path!r}: base expects lora_A {want_a} and "
                f"lora_B {want_b} (r={config.r}), adapter has {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        diagonal = pair.get("E")
        if (config.adalora is not None) != (diagonal is not None):
            which = "lacks" if config.adalora is not None else "has"
            raise AdapterFormatError(f"{path!r} {which} lora_E, but the adapter is "
                                     f"{config.method}")  # fmt: skip
        if diagonal is not None and tuple(diagonal.shape) != (config.r, 1):
            raise AdapterFormatError(
                f"{path!r}: lora_E is {tuple(diagonal.shape)}, AdaLoRA r={config.r} expects "
                f"({config.r}, 1)"
            )
        magnitude = pair.get("M")
        if config.use_dora != (magnitude is not None):
            which = "lacks" if config.use_dora else "has"
            raise AdapterFormatError(
                f"{path!r} {which} lora_magnitude_vector, but use_dora is {config.use_dora}"
            )
        if magnitude is not None and tuple(magnitude.shape) != (base.out_features,):
            raise AdapterFormatError(
                f"{path!r}: lora_magnitude_vector is {tuple(magnitude.shape)}, the base expects "
                f"({base.out_features},)"
            )


@torch.no_grad()
def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> LoraConfig:
    """Inject and fill LoRA layers from a PEFT-format adapter directory (ours or PEFT's).

    If the model already has LoRA layers, they must be exactly the adapter's modules (strict:
    missing or unexpected keys are errors) and their weights are overwritten.

    Returns:
        The adapter's config.

    Raises:
        AdapterFormatError: bad files, unknown keys, missing keys, or shapes of another base.
    """
    config = read_adapter_config(adapter_dir)
    modules = parse_adapter_keys(read_adapter_weights(adapter_dir))
    check_adapter_shapes(model, config, modules)
    existing = lora_modules(model)
    if existing:
        if set(existing) != set(modules):
            missing = sorted(set(existing) - set(modules))
            unexpected = sorted(set(modules) - set(existing))
            raise AdapterFormatError(
                f"adapter modules differ from the model's LoRA layers: missing {missing}, "
                f"unexpected {unexpected}"
            )
    else:
        order = [n for n, _ in model.named_modules() if n in modules]
        inject_lora(model, config, module_paths=order, dtype=dtype)
        existing = lora_modules(model)
    for path, layer in existing.items():
        if layer.use_dora != config.use_dora or layer.adalora != (config.adalora is not None):
            raise AdapterFormatError(
                f"{path!r}: the model's layer and the adapter differ in method"
            )
        layer.lora_A.weight.copy_(modules[path]["A"])
        layer.lora_B.weight.copy_(modules[path]["B"])
        if config.use_dora:
            layer.lora_magnitude_vector.copy_(modules[path]["M"])
        if config.adalora is not None:
            layer.lora_E.copy_(modules[path]["E"])
        layer.scaling = config.scaling
    return config
