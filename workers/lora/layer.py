"""The LoRA linear layer: y = x W0ᵀ + b + scaling · dropout(x) Aᵀ Bᵀ.

W0 and b stay in the wrapped ``nn.Linear`` (``base_layer``) and are never copied, so the base
can be a read-only tensor mapped from shared memory. ``lora_A``/``lora_B`` are ``nn.Linear``
modules only so that state-dict keys read ``…q_proj.lora_A.weight`` exactly as PEFT writes them;
the forward uses their weights directly.

The training forward is one autograd node (``_LoraLinearFn``) rather than PEFT's chain of
base linear → A → B → ·scaling → +: scaling is folded into the small (tokens × r) activation
and the update is accumulated into the base output by the GEMM itself (``addmm_``), so no
full-size (tokens × out) temporary is multiplied or added, in either direction.

DoRA (``use_dora``) adds a trainable magnitude m (out,), initialised to the row norms of W0:

    y = (m / ‖W0 + s·B·A‖) ⊙ (x W0ᵀ + s · x Aᵀ Bᵀ) + b,

the norm per output row and, as in the DoRA paper (§4.3) and PEFT, detached from the graph (a
constant in the backward pass). With dropout the base term keeps the undropped input, as in
PEFT: y = x W0ᵀ + b + (m/‖·‖ − 1) ⊙ x̃ W0ᵀ + (m/‖·‖) ⊙ s · x̃ Aᵀ Bᵀ, x̃ = dropout(x).

AdaLoRA (``adalora``) keeps the update in SVD form, ΔW = P Λ Q with Λ = diag(E): here
B = P (out × r), A = Q (r × in), E (r × 1), so the forward uses A ⊙ E in place of A and the
rank allocator (``workers.lora.adalora``) zeroes the E of the least important triplets.
PEFT's AdaLoRA scales by alpha / (r + 1e-5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.lora.config import InitKind
from workers.lora.errors import MergeError
from workers.lora.memory import is_read_only


class _LoraLinearFn(torch.autograd.Function):
    """Fused LoRA linear over a frozen base.

    Shapes: x (n, in), W0 (out, in), A (r, in), B (out, r).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        xl = x if x_lora is None else x_lora
        out = F.linear(x, weight, bias)  # (n, out)
        xa = (xl @ lora_a.t()).mul_(scaling)  # (n, r), scaled: the only place scaling is applied
        out.addmm_(xa, lora_b.t())  # out += xa Bᵀ, accumulated by the GEMM
        ctx.save_for_backward(xl, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.separate_lora_input = x_lora is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s: float = ctx.scaling
        need_x, need_xl, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_b = grad_out.t() @ xa if need_b else None  # (out, r), scaling already in xa
        g_b = (grad_out @ lora_b).mul_(s)  # (n, r)
        grad_a = g_b.t() @ xl if need_a else None  # (r, in)
        grad_x = grad_xl = None
        if ctx.separate_lora_input:
            grad_x = grad_out @ weight if need_x else None
            grad_xl = g_b @ lora_a if need_xl else None
        elif need_x:
            grad_x = (grad_out @ weight).addmm_(g_b, lora_a)  # base + LoRA input grads, fused
        return grad_x, grad_xl, None, None, grad_a, grad_b, None


class LoraLinear(nn.Module):
    """An ``nn.Linear`` with a low-rank trainable update; the base layer stays frozen.

    Args:
        base_layer: the linear layer to adapt; its parameters are frozen, not copied.
        r: rank.
        scaling: multiplier of B·A (alpha/r or alpha/sqrt(r)).
        dropout: dropout probability on the LoRA branch's input (training only).
        init: initialisation of A; B always starts at zero so the layer starts as the base.
        dtype: dtype of A and B; defaults to float32 for half-precision bases (so small
            updates are not lost to rounding), otherwise the base's dtype.
        use_dora: also learn DoRA's magnitude vector (``lora_magnitude_vector``, PEFT's key).
        adalora: AdaLoRA's SVD form: a learned diagonal E (``lora_E``) between B and A.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: InitKind = "gaussian",
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
        adalora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.scaling = scaling
        self.dropout_p = dropout
        self.merged = False
        self.disabled = False
        base_dtype = base_layer.weight.dtype
        if dtype is None:
            dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        device = base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.use_dora = use_dora
        self.adalora = adalora
        if adalora:  # Λ starts at zero: the layer starts at the base whatever A and B are
            self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                torch.ones(self.out_features, device=device, dtype=dtype)
            )
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: InitKind = "gaussian") -> None:
        """A random (Gaussian std 1/r, or PEFT's kaiming-uniform), B zero: starts at the base.
        AdaLoRA (PEFT's init): A and B ~ N(0, 0.02²), E zero."""
        if self.adalora:
            nn.init.normal_(self.lora_A.weight, std=0.02)
            nn.init.normal_(self.lora_B.weight, std=0.02)
            nn.init.zeros_(self.lora_E)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora and self.base_layer.weight.device.type != "meta":
            # B = 0: m = ‖W0‖ per row, so the layer starts exactly at the base
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def effective_a(self) -> torch.Tensor:
        """A, or AdaLoRA's A ⊙ E (r × in): what multiplies the input."""
        a = self.lora_A.weight
        return a * self.lora_E if self.adalora else a

    def named_lora_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's trained tensors under PEFT's key suffixes, in optimizer order: the one
        owner of what an adapter file and a checkpoint hold per layer."""
        if self.adalora:  # PEFT's AdaLoRA keys carry no ".weight"
            return {"lora_A": self.lora_A.weight, "lora_B": self.lora_B.weight,
                    "lora_E": self.lora_E}  # fmt: skip
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row (out,), in float32, outside the autograd graph."""
        with torch.no_grad():
            w = self.base_layer.weight.to(torch.float32)
            a, b = self.effective_a().to(torch.float32), self.lora_B.weight.to(torch.float32)
            return torch.linalg.vector_norm(w + self.scaling * (b @ a), dim=1)

    def dora_scale(self) -> torch.Tensor:
        """m / ‖W0 + s·B·A‖ (out,): the gradient reaches m, not the detached norm."""
        m = self.lora_magnitude_vector
        return m / self.weight_norm().to(m.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A, shape (out, in), in the base weight's dtype."""
        a, b = self.effective_a(), self.lora_B.weight
        return (b @ a).mul_(self.scaling).to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        a, b = self.effective_a(), self.lora_B.weight
        x_lora = None
        if self.training and self.dropout_p > 0:
            x_lora = F.dropout(x, p=self.dropout_p, training=True)
        if self.use_dora:
            return self._forward_dora(x, x_lora)
        if not isinstance(self.base_layer, nn.Linear):  # a quantized base (QLoRA)
            return self._forward_unfused(x, x_lora)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if (
            x.dtype != a.dtype
            or weight.dtype != a.dtype
            or torch.is_autocast_enabled(x.device.type)
        ):
            return self._forward_unfused(x, x_lora)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xl2 = None if x_lora is None else x_lora.reshape(-1, self.in_features)
        out = _LoraLinearFn.apply(x2, xl2, weight, bias, a, b, self.scaling)
        return out.reshape(*lead, self.out_features)

    def _forward_dora(self, x: torch.Tensor, x_lora: torch.Tensor | None) -> torch.Tensor:
        """DoRA's forward (module docstring), as PEFT computes it."""
        bias = self.base_layer.bias
        dtype = self.lora_A.weight.dtype
        scale = self.dora_scale()  # (out,)
        base = self._matmul(x)  # x W0ᵀ, no bias
        xl = (x if x_lora is None else x_lora).to(dtype)
        update = self.lora_B(self.lora_A(xl)) * self.scaling
        if x_lora is None:
            out = scale * (base.to(dtype) + update)
        else:  # PEFT: the magnitude term scales W0 applied to the dropped input
            dropped = self._matmul(x_lora).to(dtype)
            out = base.to(dtype) + (scale - 1) * dropped + scale * update
        out = out.to(base.dtype)
        return out + bias if bias is not None else out

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W0ᵀ without the bias (a quantized base dequantizes inside its own autograd node)."""
        matmul = getattr(self.base_layer, "matmul", None)
        if matmul is not None:
            out: torch.Tensor = matmul(x)
            return out
        return F.linear(x, self.base_layer.weight)

    def _forward_unfused(self, x: torch.Tensor, x_lora: torch.Tensor | None) -> torch.Tensor:
        """Plain composition, for mixed dtypes and autocast (which custom Functions bypass)."""
        result = self.base_layer(x)
        xl = (x if x_lora is None else x_lora).to(self.lora_A.weight.dtype)
        update = self.lora_B(F.linear(xl, self.effective_a())) * self.scaling
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self, *, safe: bool = True) -> None:
        """Fold scaling·B·A into W0 so inference costs exactly the base.

        Args:
            safe: check on a copy that the merged weight is finite before touching W0.

        Raises:
            MergeError: already merged, non-finite result, or a read-only base weight.
        """
        if self.merged:
            raise MergeError("adapter is already merged")
        if not isinstance(self.base_layer, nn.Linear):
            raise MergeError("cannot merge into a quantized base; load the base unquantized")
        weight = self.base_layer.weight
        if is_read_only(weight):
            raise MergeError(
                "cannot merge into a read-only (shared) base weight; load a private copy of "
                "the base to merge"
            )
        merged = self.merged_weight()
        if safe and not torch.isfinite(merged).all():
            raise MergeError("merging would produce non-finite weights; base left unchanged")
        if self.use_dora:  # unmerge divides by this scale again
            self._merged_scale = self.dora_scale().detach().clone()
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + s·B·A, or DoRA's (m/‖W0 + s·B·A‖) ⊙ (W0 + s·B·A), in the base's dtype."""
        weight = self.base_layer.weight
        merged = weight.to(torch.float32) + self.delta_weight().to(torch.float32)
        if self.use_dora:
            merged = self.dora_scale().to(torch.float32)[:, None] * merged
        return merged.to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scaling·B·A from W0 again (restores W0 up to float rounding)."""
        if not self.merged:
            raise MergeError("adapter is not merged")
        weight = self.base_layer.weight
        if self.use_dora:
            restored = weight.to(torch.float32) / self._merged_scale.to(torch.float32)[:, None]
            weight.copy_((restored - self.delta_weight().to(torch.float32)).to(weight.dtype))
        else:
            weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout_p}, merged={self.merged}"
            + (", dora=True" if self.use_dora else "")
            + (", adalora=True" if self.adalora else "")
        )
