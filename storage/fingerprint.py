"""Content fingerprints of base models, read straight from safetensors headers.

A fingerprint ties an adapter to the exact base it was trained on. It hashes the model's
``config.json`` (minus fields that do not change the weights' meaning), every tensor's name,
dtype and shape, and a sample of each tensor's bytes (its first and last 4 KiB plus evenly
spaced blocks) — or, with ``full=True``, every byte. Two bases with the same architecture but
different weights therefore differ, and reading a 7B base costs kilobytes, not gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import StorageError

SAMPLE_BYTES = 4096
SAMPLE_BLOCKS = 8
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class FingerprintError(StorageError, ValueError):
    """A model directory cannot be fingerprinted (missing or malformed files)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    architecture: str
    parameter_count: int
    tensors: dict[str, TensorInfo]


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where tensor data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise FingerprintError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES:
            raise FingerprintError(f"{path} has an implausible header size ({n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FingerprintError(f"{path} has a malformed safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise FingerprintError(f"{path} has a malformed safetensors header")
    return header, 8 + n


def tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file in a model directory."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FingerprintError(f"{model_dir} has no *.safetensors weights")
    out: dict[str, TensorInfo] = {}
    for f in files:
        header, start = read_safetensors_header(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            out[name] = TensorInfo(
                meta["dtype"], tuple(meta["shape"]), f.name, start + b, start + e
            )
    return out


def _sample_ranges(begin: int, end: int) -> list[tuple[int, int]]:
    size = end - begin
    if size <= SAMPLE_BYTES * (SAMPLE_BLOCKS + 2):
        return [(begin, end)]
    step = size // (SAMPLE_BLOCKS + 1)
    ranges = [(begin, begin + SAMPLE_BYTES), (end - SAMPLE_BYTES, end)]
    ranges += [
        (begin + k * step, begin + k * step + SAMPLE_BYTES) for k in range(1, SAMPLE_BLOCKS + 1)
    ]
    return sorted(ranges)


def fingerprint_model_dir(model_dir: str | Path, *, full: bool = False) -> Fingerprint:
    """Fingerprint a Hugging Face model directory (config + safetensors).

    Raises:
        FingerprintError: no ``config.json`` or no readable safetensors weights.
    """
    root = Path(model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FingerprintError(f"{root} has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise FingerprintError(f"{cfg_path} is not valid JSON: {exc}") from None
    tensors = tensor_index(root)
    h = hashlib.sha256()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(stable, sort_keys=True).encode())
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"\n{name}|{t.dtype}|{list(t.shape)}\n".encode())
            if t.file not in handles:
                handles[t.file] = stack.enter_context(open(root / t.file, "rb"))
            fh = handles[t.file]
            ranges = [(t.begin, t.end)] if full else _sample_ranges(t.begin, t.end)
            for b, e in ranges:
                fh.seek(b)
                remaining = e - b
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise FingerprintError(f"{t.file} is truncated")
                    h.update(chunk)
                    remaining -= len(chunk)
    params = 0
    for t in tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        params += n
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    return Fingerprint(h.hexdigest(), str(arch), params, tensors)
