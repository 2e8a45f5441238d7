"""LoRA hyperparameters: one validated dataclass, convertible to and from PEFT's config file.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a weight W0 (out × in) and learns a low-rank
update: W = W0 + scaling · B·A with A (r × in), B (out × r). ``scaling`` is alpha / r, or
alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732), which keeps the update's
magnitude stable as r grows. DoRA (Liu et al., 2024, arXiv:2402.09353; ``use_dora``) learns a
magnitude m (one per output row) besides the direction: W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖,
the norm taken per output row — PEFT's ``use_dora`` and ``lora_magnitude_vector``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from workers.lora.errors import LoraConfigError

InitKind = Literal["gaussian", "kaiming"]
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's rank budget (Zhang et al., 2023, arXiv:2303.10512): every layer starts at rank
    r; after ``tinit`` steps the total budget falls (cubically) to ``target_r`` per layer by
    step ``total_step - tfinal``, pruning every ``delta_t`` steps the triplets whose
    importance (sensitivity × uncertainty, EMAs ``beta1`` / ``beta2``) is lowest; then it stays.
    ``orth_reg`` weighs the regulariser ‖PᵀP − I‖ + ‖QQᵀ − I‖ that keeps P and Q orthogonal.
    """

    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5

    @classmethod
    def for_steps(cls, target_r: int, total_step: int) -> AdaLoraSchedule:
        """The schedule a job gets: the first 10 % of steps at full rank, pruning every ~3 %
        of the steps, the last 20 % at the target budget."""
        return cls(target_r=target_r, total_step=total_step, tinit=total_step // 10,
                   tfinal=total_step // 5, delta_t=max(1, total_step // 30))  # fmt: skip

    def __post_init__(self) -> None:
        if self.target_r < 1:
            raise LoraConfigError("target_r", f"must be ≥ 1, got {self.target_r}")
        if self.total_step < 1 or self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
            raise LoraConfigError("adalora", "steps must be positive (tinit, tfinal ≥ 0)")
        if self.tinit + self.tfinal >= self.total_step:
            raise LoraConfigError(
                "adalora", f"tinit + tfinal ({self.tinit} + {self.tfinal}) must be below the "
                f"total steps ({self.total_step}): no step would prune")  # fmt: skip


# PEFT config keys we understand; anything else that changes the math is refused on load.
_PEFT_NEUTRAL_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_type",
    "fan_in_fan_out",
    "lora_alpha",
    "lora_dropout",
    "r",
    "target_modules",
    "use_rslora",
    "init_lora_weights",
    "bias",
    "modules_to_save",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "layer_replication",
    "exclude_modules",
    "lora_bias",
    "eva_config",
    "corda_config",
    "trainable_token_indices",
    "use_qalora",
    "qalora_group_size",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "ensure_weight_tying",
    "peft_version",
}


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
        r: rank of the update (≥ 1).
        alpha: numerator of the scaling factor; the update is multiplied by alpha/r
            (or alpha/sqrt(r) with ``use_rslora``).
        dropout: dropout probability applied to the LoRA branch's input during training.
        target_modules: which ``nn.Linear`` modules get an adapter: a list of names matched
            against the end of each module path (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), a regular expression matched against the
            full path, or ``"all-linear"`` (every linear layer except the output head).
        use_rslora: rank-stabilised scaling alpha/sqrt(r).
        init: ``"gaussian"`` (the LoRA paper: A ~ N(0, 1/r), B = 0) or ``"kaiming"`` (PEFT's
            default: A ~ kaiming-uniform(a=√5), B = 0). Either way training starts exactly
            at the base model.
        bias: only ``"none"``: biases stay frozen.
        use_dora: DoRA: also learn a per-output-row magnitude (PEFT's ``use_dora``).
        base_quantization: hold the frozen base quantized while training (QLoRA): ``"none"``,
            ``"int8"`` or ``"nf4"``. Not part of the adapter file: the adapter is for the
            unquantized base.
        adalora: AdaLoRA's schedule; set, the adapter is AdaLoRA (``r`` is its initial rank;
            PEFT's ``peft_type: ADALORA`` files).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    init: InitKind = "gaussian"
    bias: Literal["none"] = "none"
    use_dora: bool = False
    base_quantization: Literal["none", "int8", "nf4"] = "none"
    adalora: AdaLoraSchedule | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adalora, dict):  # from as_dict() / JSON
            object.__setattr__(self, "adalora", AdaLoraSchedule(**self.adalora))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraConfigError("r", f"must be an integer ≥ 1, got {self.r!r}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise LoraConfigError("alpha", f"must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("gaussian", "kaiming"):
            raise LoraConfigError("init", f"must be 'gaussian' or 'kaiming', got {self.init!r}")
        if self.bias != "none":
            raise LoraConfigError("bias", f"only 'none' is supported, got {self.bias!r}")
        if not isinstance(self.use_dora, bool):
            raise LoraConfigError("use_dora", f"must be true or false, got {self.use_dora!r}")
        if self.adalora is not None:
            if self.use_dora:
                raise LoraConfigError("method", "AdaLoRA and DoRA do not combine")
            if self.adalora.target_r > self.r:
                got = self.adalora.target_r
                raise LoraConfigError("target_r", f"must be at most r = {self.r}, got {got}")
        if self.base_quantization not in ("none", "int8", "nf4"):
            raise LoraConfigError(
                "base_quantization", f"must be none, int8 or nf4, got {self.base_quantization!r}"
            )
        targets = self.target_modules
        if isinstance(targets, list | set | frozenset):
            targets = tuple(sorted(targets)) if not isinstance(targets, list) else tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        if isinstance(targets, str):
            if not targets:
                raise LoraConfigError("target_modules", "must not be empty")
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as exc:
                    raise LoraConfigError(
                        "target_modules", f"is not a valid regular expression: {exc}"
                    ) from None
        elif isinstance(targets, tuple):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise LoraConfigError(
                    "target_modules", f"must be a non-empty list of module names, got {targets!r}"
                )
        else:
            raise LoraConfigError(
                "target_modules", f"must be a list of names, a regex or 'all-linear': {targets!r}"
            )

    @property
    def method(self) -> str:
        """``"lora"``, ``"dora"`` or ``"adalora"``: what the catalog and the job spec call it."""
        if self.adalora is not None:
            return "adalora"
        return "dora" if self.use_dora else "lora"

    @property
    def scaling(self) -> float:
        """The factor multiplying B·A: alpha/r, or alpha/sqrt(r) with rsLoRA; AdaLoRA (as
        PEFT): alpha / (r + 1e-5)."""
        if self.adalora is not None:
            return self.alpha / (self.r + 1e-5)
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for the same adapter."""
        targets = self.target_modules
        if self.adalora is not None:
            s = self.adalora
            return {
                "peft_type": "ADALORA", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model_name_or_path, "r": self.r,
                "init_r": self.r, "target_r": s.target_r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout,
                "target_modules": targets if isinstance(targets, str) else sorted(targets),
                "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.delta_t, "beta1": s.beta1,
                "beta2": s.beta2, "orth_reg_weight": s.orth_reg, "total_step": s.total_step,
                "rank_pattern": None, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "inference_mode": True,
            }  # fmt: skip
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "use_rslora": self.use_rslora,
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "bias": self.bias,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "use_dora": self.use_dora,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read PEFT's ``adapter_config.json`` content; refuse features that change the math.

        Raises:
            LoraConfigError: naming the field that is unsupported or invalid.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type == "ADALORA":
            return cls._from_adalora_dict(data)
        if peft_type != "LORA":
            raise LoraConfigError("peft_type", f"only LORA and ADALORA adapters are supported, "
                                  f"got {peft_type}")  # fmt: skip
        unsupported: dict[str, Any] = {
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layer_replication": None,
            "lora_bias": False,
            "trainable_token_indices": None,
            "target_parameters": None,
            "alora_invocation_tokens": None,
        }
        for key, neutral in unsupported.items():
            value = data.get(key, neutral)
            if value not in (neutral, None, {}, [], False):
                raise LoraConfigError(key, f"is not supported by lorafleet (got {value!r})")
        # PEFT adds fields with every release; an unknown one left at an empty value cannot
        # change the math, but one that is set might, so it is refused rather than ignored.
        for key in sorted(set(data) - _PEFT_NEUTRAL_KEYS):
            if data[key] not in (None, False, {}, [], ""):
                raise LoraConfigError(key, f"is not supported by lorafleet (got {data[key]!r})")
        targets = data.get("target_modules")
        if targets is None:
            raise LoraConfigError("target_modules", "is missing from adapter_config.json")
        init_raw = data.get("init_lora_weights", True)
        init: InitKind = "gaussian" if init_raw == "gaussian" else "kaiming"
        return cls(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
            use_rslora=bool(data.get("use_rslora", False)),
            init=init,
            bias=data.get("bias", "none"),
            use_dora=bool(data.get("use_dora", False)),
        )

    @classmethod
    def _from_adalora_dict(cls, data: dict[str, Any]) -> LoraConfig:
        if data.get("rank_pattern"):  # pruned triplets stored truncated: not read (yet)
            raise LoraConfigError(
                "rank_pattern",
                "AdaLoRA files with a rank_pattern are not supported; save "
                "with the pruned triplets zeroed in lora_E",
            )
        for key in ("fan_in_fan_out", "modules_to_save"):
            if data.get(key):
                raise LoraConfigError(key, f"is not supported by lorafleet (got {data[key]!r})")
        targets = data.get("target_modules")
        if targets is None:
            raise LoraConfigError("target_modules", "is missing from adapter_config.json")
        init_r = int(data.get("init_r", 12))
        schedule = AdaLoraSchedule(
            target_r=int(data.get("target_r", 8)), total_step=int(data.get("total_step") or 1),
            tinit=int(data.get("tinit", 0)), tfinal=int(data.get("tfinal", 0)),
            delta_t=int(data.get("deltaT", 1)),
            beta1=float(data.get("beta1", 0.85)), beta2=float(data.get("beta2", 0.85)),
            orth_reg=float(data.get("orth_reg_weight", 0.5)),
        )  # fmt: skip
        return cls(r=init_r, alpha=float(data.get("lora_alpha", 8)),
                   dropout=data.get("lora_dropout", 0.0) or 0.0,
                   target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
                   adalora=schedule)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON view (for metrics, lineage and the catalog)."""
        out = asdict(self)
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        return out
