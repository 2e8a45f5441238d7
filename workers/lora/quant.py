"""A frozen base held quantized under the LoRA layers (QLoRA: Dettmers et al., 2023,
arXiv:2305.14314).

Every linear weight of the base but the output head is replaced by a ``QuantizedLinear`` that
keeps only its codes and scales and dequantizes the weight on the fly in each forward (and in
the backward, through autograd, for the input gradient); LoRA's A and B stay in full precision,
and the adapter is a plain PEFT adapter for the unquantized base.

- ``nf4``: 4-bit NormalFloat, blocks of 64 weights sharing one absmax scale; the 16 code values
  are the quantiles of N(0, 1) rescaled to [-1, 1] (the paper's NF4, bitsandbytes' table).
  Double quantization stores the absmax scales themselves in 8 bits: minus their mean, in
  blocks of 256 with one float32 scale each. ≈ 0.52 bytes per weight (fp32: 4, bf16: 2).
- ``int8``: one absmax scale per output row, symmetric 8-bit codes (vector-wise, as
  LLM.int8() quantizes rows, without its outlier columns). ≈ 1 byte per weight.

The codecs are small pure functions here. Where ``bitsandbytes`` is installed and runs (its
CPU backend does, here), NF4 goes through its ``quantize_4bit`` / ``dequantize_4bit`` with the
same table and block size; without it, the fallback below does the same arithmetic — the tests
check the two agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.lora.errors import LoraConfigError

Quantization = Literal["none", "int8", "nf4"]
NF4_BLOCK, ABSMAX_BLOCK = 64, 256
# bitsandbytes' NF4 table (QLoRA, appendix E): quantiles of N(0, 1), normalised to [-1, 1]
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


# -- NF4 (fallback codec) ----------------------------------------------------------------------
@dataclass(frozen=True)
class NF4Weight:
    """A weight in NF4: two 4-bit codes per byte, absmax per 64 weights (double-quantized)."""

    packed: torch.Tensor  # uint8 (numel/2,)
    absmax_codes: torch.Tensor  # uint8 (blocks,): (absmax - offset) / scale2, rounded
    absmax_scale: torch.Tensor  # float32 (ceil(blocks/256),)
    offset: float
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.packed, self.absmax_codes, self.absmax_scale)) + 4  # fmt: skip


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % size
    return F.pad(flat, (0, pad)).reshape(-1, size)


def nf4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0…15 per weight, absmax per block of 64): the nearest NF4 value of w / absmax."""
    blocks = _blocks(w.to(torch.float32), NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # nearest value = count of midpoints below
    codes = torch.bucketize(normed, mids)
    return codes.reshape(-1)[: w.numel()].to(torch.uint8), absmax


def quantize_nf4(w: torch.Tensor) -> NF4Weight:
    """NF4 with double quantization (module docstring)."""
    codes, absmax = nf4_codes(w)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = float(absmax.mean())
    centred = _blocks(absmax - offset, ABSMAX_BLOCK)
    scale2 = centred.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(centred / scale2[:, None]).clamp(-127, 127).to(torch.int16) + 128
    return NF4Weight(packed, q.reshape(-1)[: absmax.numel()].to(torch.uint8), scale2, offset,
                     tuple(w.shape))  # fmt: skip


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an ``NF4Weight`` stands for."""
    n = math.prod(q.shape)
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[:n].long()
    blocks = q.absmax_codes.numel()
    centred = _blocks(q.absmax_codes.to(torch.float32) - 128.0, ABSMAX_BLOCK)
    absmax = (centred * q.absmax_scale[:, None]).reshape(-1)[:blocks] + q.offset
    values = _blocks(NF4_CODE[codes], NF4_BLOCK) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(q.shape).to(dtype)


# -- int8 ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Weight:
    """Symmetric int8 codes with one float32 scale per output row."""

    codes: torch.Tensor  # int8 (out, in)
    scale: torch.Tensor  # float32 (out,)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w32 = w.to(torch.float32)
    scale = w32.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    codes = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scale)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.codes.to(torch.float32) * q.scale[:, None]).to(dtype)


# -- bitsandbytes, where it runs -----------------------------------------------------------------
@functools.cache  # probed once per process, not once per quantized layer
def bitsandbytes_nf4() -> Any | None:
    """``bitsandbytes.functional`` if it imports and round-trips an NF4 block on this machine."""
    try:
        import bitsandbytes.functional as bnb_f

        probe = torch.linspace(-1, 1, NF4_BLOCK)
        packed, state = bnb_f.quantize_4bit(probe, blocksize=NF4_BLOCK, quant_type="nf4")
        bnb_f.dequantize_4bit(packed, state)
        return bnb_f
    except Exception:  # not installed, or no kernel for this device: the fallback serves
        return None


# -- the layer -----------------------------------------------------------------------------------
class _DequantMatmul(torch.autograd.Function):
    """x Wᵀ with W dequantized in the forward and again in the backward: no full-precision
    weight stays alive between them (saving it would undo the memory QLoRA saves)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.weight.to(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored quantized; ``weight`` is dequantized when read."""

    def __init__(self, linear: nn.Linear, kind: Quantization, *, backend: str = "auto") -> None:
        super().__init__()
        if kind not in ("int8", "nf4"):
            raise LoraConfigError("base_quantization", f"must be int8 or nf4, got {kind!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind = kind
        self.compute_dtype = linear.weight.dtype
        w = linear.weight.detach()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self._bnb = bitsandbytes_nf4() if kind == "nf4" and backend != "lorafleet" else None
        if backend == "bitsandbytes" and kind == "nf4" and self._bnb is None:
            raise LoraConfigError("base_quantization", "bitsandbytes does not run here")
        self.backend = "bitsandbytes" if self._bnb is not None else "lorafleet"
        self.q: Any
        if self._bnb is not None:
            self.q = self._bnb.quantize_4bit(w.to(torch.float32).contiguous(),
                                             blocksize=NF4_BLOCK, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
        elif kind == "nf4":
            self.q = quantize_nf4(w)
        else:
            self.q = quantize_int8(w)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), made for this read and dropped after it."""
        if self._bnb is not None:
            packed, state = self.q
            return self._bnb.dequantize_4bit(packed, state).to(self.compute_dtype)
        if self.kind == "nf4":
            return dequantize_nf4(self.q, self.compute_dtype)
        return dequantize_int8(self.q, self.compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the stored weight takes (codes and scales; the bias not included)."""
        if self._bnb is not None:
            packed, state = self.q
            extra = state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                extra += state.state2.absmax.numel() * 4
            return int(packed.numel() * packed.element_size() + extra)
        return int(self.q.nbytes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias (memory-light in the backward: see ``_DequantMatmul``)."""
        out: torch.Tensor = _DequantMatmul.apply(x, self)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.kind} "
                f"({self.backend})")  # fmt: skip


@dataclass(frozen=True)
class QuantReport:
    """What quantizing a base changed: layers, and linear-weight bytes before and after."""

    kind: str
    layers: int
    bytes_before: int
    bytes_after: int
    backend: str

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@torch.no_grad()
def quantize_base(model: nn.Module, kind: Quantization, *, backend: str = "auto") -> QuantReport:
    """Hold every linear weight of ``model`` but the output head quantized, in place.

    LoRA layers keep their A and B (and DoRA magnitude) in full precision; their base layer is
    quantized. A fresh DoRA magnitude (B = 0) is re-measured on the quantized weight, so the
    layer still starts exactly at the (quantized) base, as PEFT does for QLoRA + DoRA.
    """
    from workers.lora.inject import _output_head, lora_modules
    from workers.lora.layer import LoraLinear

    if kind == "none":
        return QuantReport(kind, 0, 0, 0, "none")
    head = _output_head(model)
    loras = {id(m.base_layer): m for m in lora_modules(model).values()}
    before = after = layers = 0
    backends = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            if isinstance(parent, LoraLinear) and name != "base_layer":
                continue  # A and B stay in full precision
            q = QuantizedLinear(child, kind, backend=backend)
            before += child.weight.numel() * child.weight.element_size()
            after += q.nbytes
            layers += 1
            backends.add(q.backend)
            setattr(parent, name, q)
            owner = loras.get(id(child))
            if owner is not None and owner.use_dora and not owner.lora_B.weight.any():
                owner.lora_magnitude_vector.copy_(owner.weight_norm())
    return QuantReport(kind, layers, before, after, ",".join(sorted(backends)))
