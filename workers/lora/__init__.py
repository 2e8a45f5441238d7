"""The LoRA method: config, layer, injection, merging and PEFT-format io.

This package imports nothing from the rest of lorafleet, so any worker (training, serving)
and any test can use it alone.
"""

from workers.lora.config import ALL_LINEAR, LoraConfig
from workers.lora.errors import (
    AdapterFormatError,
    LoraConfigError,
    LoraError,
    MergeError,
    TargetModulesError,
)
from workers.lora.inject import (
    inject_lora,
    linear_module_names,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    match_target_modules,
    remove_lora,
)
from workers.lora.io import load_adapter, read_adapter_config, save_adapter
from workers.lora.layer import LoraLinear
from workers.lora.merge import merge_lora, merge_state_dict, merged_base_state_dict, unmerge_lora

__all__ = [
    "ALL_LINEAR",
    "AdapterFormatError",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "LoraLinear",
    "MergeError",
    "TargetModulesError",
    "inject_lora",
    "linear_module_names",
    "load_adapter",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "match_target_modules",
    "merge_lora",
    "merge_state_dict",
    "merged_base_state_dict",
    "read_adapter_config",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
]
