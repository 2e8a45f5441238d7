"""The frozen base once per node on CPU: one file in /dev/shm, mapped read-only by every worker.

The node's first worker writes the base's tensors (in the training dtype) to a node-local
safetensors file in ``/dev/shm``; every worker of the node — that one included — maps the file
read-only and builds its model on the meta device with those mapped tensors assigned as the
parameters (``load_state_dict(assign=True)``). All workers of a node therefore share the same
physical pages: the base is counted once per node, not once per worker (measure PSS, not RSS).

Never hand such a model to plain DDP: its constructor broadcasts every parameter, which would
write into the read-only map (SIGSEGV) — gradients of the LoRA parameters are all-reduced
explicitly instead (see ``collectives``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from workers.base_model import load_base, load_base_config
from workers.errors import BaseModelError

log = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real (rotary tables are buffers
    that ``load_state_dict`` would never fill)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            kwargs = {"requires_grad": p.requires_grad}
            module._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def shm_path_for(job: str, node_id: str, directory: Path = SHM_DIR) -> Path:
    """The node-local file of one job's base (node id in the name: simulated nodes share /dev/shm)."""
    safe_job = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)[:80]
    return directory / f"lorafleet-base-{safe_job}-{node_id[:16]}.safetensors"


def write_shared_base(base_dir: str | Path, path: Path, *, dtype: torch.dtype) -> Path:
    """Load the base once and write its tensors to ``path`` (atomically) for mapping."""
    model, _ = load_base(base_dir, dtype=dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors refuses duplicates, so keep the first name.
    seen: dict[int, str] = {}
    unique = {}
    aliases = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen:
            aliases[k] = seen[ptr]
        else:
            seen[ptr] = k
            unique[k] = v
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(unique, str(tmp), metadata={"aliases": json.dumps(aliases)})
    os.replace(tmp, path)
    del model, state, unique
    return path


def map_safetensors_read_only(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file as read-only views of one shared ``mmap``."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        raw = torch.from_numpy(mapped)  # read-only MAP_SHARED: writes would fault, never copy
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dt = info["dtype"]
        torch_dtype = _DTYPES.get(dt)
        if torch_dtype is None:
            raise BaseModelError(f"{path}: unsupported dtype {dt} for tensor {name}")
        out[name] = raw[8 + n + begin : 8 + n + end].view(torch_dtype).view(info["shape"])
    return out, json.loads(meta.get("aliases", "{}"))


def load_shared_base(base_dir: str | Path, path: Path) -> nn.Module:
    """A model whose parameters are the read-only mapped tensors of ``path``."""
    from transformers import AutoModelForCausalLM

    config = load_base_config(base_dir)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    tensors, aliases = map_safetensors_read_only(path)
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise BaseModelError(
            f"shared base {path} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise BaseModelError(f"parameter {name} was not filled from {path}")
    model.eval()
    model.requires_grad_(False)
    return model


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process (shared pages divided among their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in smaps_rollup")


def describe(model: nn.Module) -> dict[str, Any]:
    """How many parameter bytes a model holds (for logs and tests)."""
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
