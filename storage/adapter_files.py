"""Check an adapter directory before any byte of it is published or imported.

Pure file inspection (no torch): the directory must hold ``adapter_config.json`` and
``adapter_model.safetensors`` (never a pickle ``.bin``), no symlinks, LoRA tensor keys only,
and — against a base's safetensors headers — modules that exist with matching shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import AdapterRejected
from storage.fingerprint import FingerprintError, TensorInfo, read_safetensors_header

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
OPTIONAL = ("metrics.json", "README.md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# lora_A / lora_B weights, and DoRA's per-row magnitude (PEFT's key has no ".weight")
_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_"
    r"(?:(?P<which>[AB])(?:\.weight)?|(?P<m>magnitude_vector)|(?P<e>E))$"
)


@dataclass(frozen=True)
class AdapterManifest:
    """What an adapter directory holds."""

    directory: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # tensor key → shape
    files: tuple[Path, ...]  # the files to store, in name order

    @property
    def r(self) -> int:
        """The rank of the stored tensors (AdaLoRA: its initial rank, ``init_r``)."""
        if self.method == "adalora":
            return int(self.config.get("init_r", 12))
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.r))

    @property
    def target_modules(self) -> list[str] | str:
        t = self.config.get("target_modules")
        return t if isinstance(t, str) else sorted(t or [])

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def method(self) -> str:
        """``adalora`` (PEFT's ADALORA), ``dora`` (its ``use_dora``) or ``lora``."""
        if self.config.get("peft_type") == "ADALORA":
            return "adalora"
        return "dora" if self.config.get("use_dora") else "lora"

    def modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in self.shapes.items():
            m = _KEY.match(key)
            assert m is not None
            out.setdefault(m["path"], {})[m["which"] or ("M" if m["m"] else "E")] = shape
        return out


def inspect_adapter_dir(directory: str | Path) -> AdapterManifest:
    """Validate the directory's layout, config and tensor keys.

    Raises:
        AdapterRejected: with a message naming the offending file or key.
    """
    root = Path(directory)
    if root.is_symlink() or not root.is_dir():
        raise AdapterRejected(f"{root} is not an adapter directory")
    entries = sorted(root.rglob("*"))
    for p in entries:
        if p.is_symlink():
            raise AdapterRejected(f"{p} is a symlink; adapter directories must hold plain files")
    names = {p.name for p in entries if p.is_file()}
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterRejected(
            f"{root} holds pickle weights ({', '.join(pickles)}); lorafleet loads safetensors "
            "only: re-save with safe_serialization=True"
        )
    for required in (CONFIG, WEIGHTS):
        if not (root / required).is_file():
            raise AdapterRejected(f"{root} has no {required}")
    try:
        config = json.loads((root / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterRejected(f"{root / CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
        raise AdapterRejected(f"{root / CONFIG} does not describe a LoRA adapter")
    r = config.get("init_r" if config.get("peft_type") == "ADALORA" else "r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterRejected(f"{root / CONFIG}: r must be an integer ≥ 1, got {r!r}")
    if not config.get("target_modules"):
        raise AdapterRejected(f"{root / CONFIG}: target_modules is missing")
    try:
        header, start = read_safetensors_header(root / WEIGHTS)
    except FingerprintError as exc:
        raise AdapterRejected(str(exc)) from None
    shapes: dict[str, tuple[int, ...]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not _KEY.match(key):
            raise AdapterRejected(f"{root / WEIGHTS}: unexpected tensor {key!r} (not LoRA A/B)")
        shapes[key] = tuple(meta["shape"])
    if not shapes:
        raise AdapterRejected(f"{root / WEIGHTS} holds no tensors")
    manifest = AdapterManifest(
        root,
        config,
        shapes,
        tuple(root / n for n in (CONFIG, WEIGHTS, *OPTIONAL) if (root / n).is_file()),
    )
    bad = nonfinite_tensor(root / WEIGHTS, header, start)
    if bad is not None:
        raise AdapterRejected(f"{root / WEIGHTS}: tensor {bad!r} holds NaN or infinite values; "
                              "nothing was published")  # fmt: skip
    for path, pair in manifest.modules().items():
        if not {"A", "B"} <= set(pair):
            raise AdapterRejected(f"{root / WEIGHTS}: module {path!r} lacks lora_A or lora_B")
        if ("E" in pair) != (manifest.method == "adalora"):
            raise AdapterRejected(
                f"{root / WEIGHTS}: module {path!r}: lora_E goes with an ADALORA config, and "
                "only with it"
            )
        if ("M" in pair) != (manifest.method == "dora"):
            raise AdapterRejected(
                f"{root / WEIGHTS}: module {path!r}: a magnitude vector goes with use_dora "
                "in adapter_config.json, and only with it"
            )
    return manifest


_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def nonfinite_tensor(path: Path, header: dict[str, Any], start: int) -> str | None:
    """The first tensor of a safetensors file holding NaN or ±inf (None: all finite).

    Read tensor by tensor from the raw bytes (bfloat16 widened to float32 exactly), so a
    check needs no framework and no more memory than the largest tensor.
    """
    import numpy as np

    with open(path, "rb") as fh:
        for name, meta in sorted(header.items(), key=lambda kv: str(kv[0])):
            if name == "__metadata__" or meta.get("dtype") not in _FLOATS:
                continue
            b, e = meta["data_offsets"]
            fh.seek(start + b)
            raw = np.frombuffer(fh.read(e - b), dtype=_FLOATS[meta["dtype"]])
            values = (raw.astype(np.uint32) << 16).view(np.float32) if meta["dtype"] == "BF16" \
                else raw  # fmt: skip
            if not bool(np.isfinite(values).all()):
                return str(name)
    return None


def check_against_base(manifest: AdapterManifest, base_tensors: dict[str, TensorInfo]) -> None:
    """Every adapted module must exist in the base as a 2-D weight of matching shape.

    Raises:
        AdapterRejected: naming the module and both shapes.
    """
    r = manifest.r
    for path, pair in sorted(manifest.modules().items()):
        weight = base_tensors.get(f"{path}.weight")
        if weight is None:
            raise AdapterRejected(
                f"adapter targets {path!r}, which the base does not have "
                "(an adapter for another base?)"
            )
        if len(weight.shape) != 2:
            raise AdapterRejected(f"adapter targets {path!r}, which is not a linear weight")
        out_f, in_f = weight.shape
        if pair["A"] != (r, in_f) or pair["B"] != (out_f, r):
            raise AdapterRejected(
                f"adapter for another base shape at {path!r}: base weight is {out_f}×{in_f}, so "
                f"lora_A must be {(r, in_f)} and lora_B {(out_f, r)}; adapter has {pair['A']} and "
                f"{pair['B']}"
            )
        if "E" in pair and pair["E"] != (r, 1):
            raise AdapterRejected(f"{path!r}: lora_E is {pair['E']}, AdaLoRA expects {(r, 1)}")
        if "M" in pair and pair["M"] != (out_f,):
            raise AdapterRejected(
                f"{path!r}: lora_magnitude_vector is {pair['M']}, the base expects ({out_f},)"
            )
