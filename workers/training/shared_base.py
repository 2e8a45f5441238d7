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
from torch import nn

from workers.base_model import load_base_config
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

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def shm_path_for(job: str, node_id: str, directory: Path = SHM_DIR) -> Path:
    """The node-local base file of one job (the node id is in the name: simulated nodes on one
    machine share /dev/shm)."""
    safe_job = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)[:80]
    return directory / f"lorafleet-base-{safe_job}-{node_id[:16]}.safetensors"


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def write_shared_base(base_dir: str | Path, path: Path, *, dtype: torch.dtype) -> Path:
    """Stream the base's float tensors into one safetensors file at ``path`` (atomically).

    Tensors are read one at a time with plain reads (no mmap, no model): the writer's peak
    memory is about one tensor, never a private copy of the base.
    """
    from storage.fingerprint import tensor_index

    index = tensor_index(Path(base_dir))
    names = sorted(index)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = index[name]
        src_dtype = _DTYPES.get(t.dtype)
        if src_dtype is None:
            raise BaseModelError(f"{base_dir}: unsupported dtype {t.dtype} for tensor {name}")
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        numel = 1
        for d in t.shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[out_dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for name in names:
                t = index[name]
                with open(Path(base_dir) / t.file, "rb") as src:
                    raw = os.pread(src.fileno(), t.end - t.begin, t.begin)
                src_dtype = _DTYPES[t.dtype]
                tensor = torch.frombuffer(bytearray(raw), dtype=src_dtype)
                if src_dtype.is_floating_point and src_dtype != dtype:
                    tensor = tensor.to(dtype)
                out.write(tensor.view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def map_safetensors_read_only(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as read-only views of one shared ``mmap``."""
    from storage.fingerprint import read_safetensors_header

    header, data_start = read_safetensors_header(path)
    header.pop("__metadata__", None)
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
        out[name] = raw[data_start + begin : data_start + end].view(torch_dtype).view(info["shape"])
    return out


def load_shared_base(base_dir: str | Path, path: Path) -> nn.Module:
    """A model whose parameters are the read-only mapped tensors of ``path``."""
    from transformers import AutoModelForCausalLM

    config = load_base_config(base_dir)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    tensors = map_safetensors_read_only(path)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise BaseModelError(
            f"shared base {path} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if result.missing_keys:  # tied weights (e.g. lm_head = embed_tokens) are not in the file
        model.tie_weights()
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


def mapping_pss(path: Path, pid: int | str = "self") -> int:
    """PSS of this process's mappings of ``path``: its share of the shared base's pages.

    Summed over every process that maps the file, this is the file's resident size counted
    exactly once — the direct proof that a node holds the base once.
    """
    total, inside = 0, False
    target = str(path)
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header line
                parts = line.split()
                inside = len(parts) >= 6 and parts[5] == target
            elif inside and first == "Pss:":
                total += int(line.split()[1]) * 1024
    return total


def private_bytes(pid: int | str = "self") -> int:
    """Memory only this process holds (private clean + dirty pages, anonymous or file)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakSampler:
    """Samples ``private_bytes`` in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import threading

        self.interval_s = interval_s
        self.peak = private_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, private_bytes())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, private_bytes())


def describe(model: nn.Module) -> dict[str, Any]:
    """How many parameter bytes a model holds (for logs and tests)."""
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
