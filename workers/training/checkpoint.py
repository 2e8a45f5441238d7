"""The checkpoint format: one owner for what a job's checkpoint holds, alone or packed.

A checkpoint is a directory of three files — the LoRA weights under PEFT's keys, the AdamW
state and the step — and nothing of the model or the data: global batches are a pure function
of (seed, step), and so is the RNG (reseeded per step). A job packed with others writes the
same files as the job alone (its parameters in the same order), so a packed job can resume
alone and a lone job's checkpoint can resume in a pack.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.lora.inject import PEFT_PREFIX
from workers.lora.layer import LoraLinear

CKPT_WEIGHTS = "lora.safetensors"
CKPT_OPTIM = "optimizer.pt"
CKPT_STATE = "trainer_state.json"


def adapter_state(modules: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """An adapter's tensors under PEFT's file keys (A, B, and DoRA's magnitude or AdaLoRA's
    E): what an adapter file and a checkpoint hold."""
    return {f"{PEFT_PREFIX}{path}.{suffix}": tensor.detach().contiguous()
            for path, layer in modules.items()
            for suffix, tensor in layer.named_lora_tensors().items()}  # fmt: skip


def write_checkpoint(
    directory: Path, modules: dict[str, LoraLinear], optimizer: torch.optim.Optimizer, step: int
) -> None:
    """Write one job's checkpoint: ``modules`` maps module paths to that job's LoRA layers
    (in model order, as its optimizer's parameters are)."""
    save_file(adapter_state(modules), str(directory / CKPT_WEIGHTS))
    torch.save(optimizer.state_dict(), directory / CKPT_OPTIM)
    (directory / CKPT_STATE).write_text(json.dumps({"step": step}))


@torch.no_grad()
def read_checkpoint(
    directory: Path, modules: dict[str, LoraLinear], optimizer: torch.optim.Optimizer
) -> int:
    """Load a checkpoint into one job's LoRA layers and optimizer; returns its step.

    Our own files only: the optimizer state loads weights-only (no pickle code runs).
    """
    weights = load_file(str(directory / CKPT_WEIGHTS))
    for path, layer in modules.items():
        for suffix, tensor in layer.named_lora_tensors().items():
            tensor.copy_(weights[f"{PEFT_PREFIX}{path}.{suffix}"])
    optimizer.load_state_dict(torch.load(directory / CKPT_OPTIM, weights_only=True))
    return int(json.loads((directory / CKPT_STATE).read_text())["step"])
