"""The fine-tune job spec: what a user submits (YAML or JSON), validated at the boundary.

Unknown fields are rejected and every error names the field's path (``training.lr``), so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from storage.catalog.files import is_file_id
from storage.names import NAME_RE, parse_ref

NAME_RULE = "use 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
FILE_RULE = (
    "must be a file id (file-…) from `lorafleet files upload` or POST /v1/files; "
    "paths are never read on the cluster's behalf"
)


class SpecError(ValueError):
    """A job spec is invalid; ``field`` is the dotted path of the first offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


# Bounds a real cluster could run; beyond them a spec is a mistake (or an attack), refused at
# submission rather than overflowing in the runner (epochs=1e308) or never ending (1e300).
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
INT64 = 2**63 - 1


class _Strict(BaseModel):
    # allow_inf_nan: Infinity / NaN are refused at the boundary, in every float field
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, le=1e6, description="Scaling numerator (alpha/r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names, 'all-linear', or 're:<regex>'.",
    )
    rslora: bool = False
    variant: Literal["lora", "dora", "adalora"] = Field(
        "lora", description="lora; dora (a learned magnitude per output row, as PEFT's "
        "use_dora); adalora (SVD form, the rank budget spent where layers need it; r is the "
        "initial rank). Formerly lora.method (still read, with a warning).")  # fmt: skip
    target_r: int | None = Field(
        None, ge=1, le=1024, description="adalora: the average rank per layer the budget "
        "ends at (default r // 2).")  # fmt: skip
    base_quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="Hold the frozen base quantized under the LoRA layers (QLoRA)."
    )

    @model_validator(mode="before")
    @classmethod
    def _old_spelling(cls, data: Any) -> Any:
        # lora.method was the variant's name before `method` came to mean the training
        # method, as at OpenAI; its values (lora, dora, adalora) never were method names
        if isinstance(data, dict) and "method" in data and "variant" not in data:
            data = {("variant" if k == "method" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _adalora(self) -> LoraSpec:
        if self.target_r is not None and self.variant != "adalora":
            raise ValueError("target_r is AdaLoRA's: set variant: adalora, or drop it")
        if self.target_r is not None and self.target_r > self.r:
            raise ValueError(f"target_r ({self.target_r}) must be at most r ({self.r})")
        return self

    @property
    def adalora_target_r(self) -> int:
        return self.target_r or max(1, self.r // 2)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and (not v or not all(isinstance(t, str) and t for t in v)):
            raise ValueError("must be a non-empty list of module names")
        if isinstance(v, str) and not v:
            raise ValueError("must not be empty")
        return v


class DpoHyperparameters(_Strict):
    beta: float = Field(0.1, gt=0, le=100, description="How far the policy may move from "
                        "the reference (DPO's β).")  # fmt: skip


class DpoSection(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=lambda: DpoHyperparameters())


class SupervisedSection(_Strict):
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="None yet: the `training` section holds them."
    )

    @field_validator("hyperparameters")
    @classmethod
    def _none(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            raise ValueError(f"unknown hyperparameters {sorted(v)}: set them under `training`")
        return v


class ReinforcementHyperparameters(_Strict):
    group_size: int = Field(4, ge=2, le=64, description="Samples per prompt (GRPO's group).")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest sampled answer.")


class ReinforcementSection(_Strict):
    grader: dict[str, Any] = Field(description="OpenAI's grader shapes: string_check, "
                                   "text_similarity, multi.")  # fmt: skip
    hyperparameters: ReinforcementHyperparameters = Field(
        default_factory=lambda: ReinforcementHyperparameters()
    )

    @field_validator("grader")
    @classmethod
    def _grader(cls, v: dict[str, Any]) -> dict[str, Any]:
        from workers.training.graders import GraderError, parse_grader

        try:
            parse_grader(v, "grader")
        except GraderError as exc:
            raise ValueError(str(exc).removeprefix("grader.").removeprefix("grader: ")) from None
        return v


class MethodSpec(_Strict):
    """The training method, in OpenAI's shape: ``{type: dpo, dpo: {hyperparameters: {…}}}``."""

    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        "supervised", description="supervised (SFT rows), dpo (preference pairs: "
        "input.messages, preferred_output, non_preferred_output), reinforcement (prompt rows "
        "and a grader: GRPO).")  # fmt: skip
    supervised: SupervisedSection | None = None
    dpo: DpoSection | None = None
    reinforcement: ReinforcementSection | None = None

    @model_validator(mode="after")
    def _section(self) -> MethodSpec:
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("a reinforcement method needs its section: reinforcement: "
                             "{grader: …}")  # fmt: skip
        other = {"supervised", "dpo", "reinforcement"} - {self.type}
        for name in other:
            if getattr(self, name) is not None:
                raise ValueError(f"a {name} section does not belong to method type {self.type}")
        return self

    @property
    def beta(self) -> float:
        return (self.dpo or DpoSection()).hyperparameters.beta

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's ``method`` object, as the workers read it (``Method.from_dict``)."""
        if self.type == "dpo":
            return {"type": "dpo", "dpo": {"hyperparameters": {"beta": self.beta}}}
        if self.type == "reinforcement":
            assert self.reinforcement is not None
            return {"type": "reinforcement",
                    "reinforcement": self.reinforcement.model_dump(mode="json")}  # fmt: skip
        return {"type": self.type}


class TrainingSpec(_Strict):
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)
    lr: float = Field(3e-3, gt=0, lt=1)
    batch_size: int = Field(16, ge=1, le=65536, description="Examples per worker per micro-step.")
    grad_accum: int = Field(1, ge=1, le=65536)
    seq_len: int = Field(128, ge=2, le=131072)
    seed: int = Field(0, ge=0, le=INT64)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS)
    eval_every: int = Field(50, ge=0, le=MAX_STEPS)
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS)

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        return self


class ResourcesSpec(_Strict):
    nodes: int = Field(1, ge=1, le=4096)
    workers_per_node: int = Field(1, ge=1, le=256)
    gpus_per_worker: float = Field(0, ge=0, le=64)
    cpus_per_worker: float = Field(1, gt=0, le=1024)

    @property
    def workers(self) -> int:
        return self.nodes * self.workers_per_node

    @property
    def total_gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def total_cpus(self) -> float:
        return self.workers * self.cpus_per_worker


class JobSpec(_Strict):
    """A fine-tune job."""

    name: str = Field(description="Job name (names the run).")
    namespace: str = Field(description="Team that owns the job and its adapter.")
    base_model: str = Field(description="A registered base (`lorafleet base register`).")
    training_data: str = Field(description="An uploaded JSONL file: its id, file-….")
    validation_data: str | None = Field(None, description="An uploaded JSONL file id.")
    output_adapter: str = Field(description="namespace/name to publish the adapter under.")
    method: MethodSpec = Field(default_factory=lambda: MethodSpec())
    init_adapter: str | None = Field(
        None, description="Start from this adapter of the job's namespace "
        "(namespace/name[:VERSION|@ALIAS]) instead of a fresh one — a warm start: DPO after "
        "SFT. Its LoRA config is used; DPO's reference is then this adapter, frozen. The exact "
        "version is recorded in the new version's lineage.")  # fmt: skip
    lora: LoraSpec = Field(default_factory=lambda: LoraSpec())
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec())
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec())
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    max_failures: int = Field(0, ge=0, le=100)
    packing: bool = Field(
        True,
        description="Train in one worker group with other jobs on the same base (one "
        "batched forward); false: always alone.",
    )
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)
    tags: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("name", "namespace")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(NAME_RULE)
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:  # checked now, not at publish after the whole run
            if not NAME_RE.fullmatch(tag):
                raise ValueError(f"invalid tag {tag!r}: {NAME_RULE}")
        return v

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"must be the name of a registered base ({NAME_RULE}); a path is never read "
                "on the cluster's behalf: `lorafleet base register NAME DIR`"
            )
        return v

    @field_validator("training_data", "validation_data")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and not is_file_id(v):
            raise ValueError(FILE_RULE)
        return v

    @field_validator("output_adapter")
    @classmethod
    def _adapter(cls, v: str, info: ValidationInfo) -> str:
        ref = parse_ref(v)  # InvalidReference is a ValueError: pydantic reports it on the field
        if ref.version is not None or ref.alias is not None:
            raise ValueError("must be namespace/name (versions are assigned on publish)")
        namespace = info.data.get("namespace")
        if namespace is not None and ref.namespace != namespace:
            raise ValueError(f"must be in the job's namespace {namespace!r}")
        return v

    @model_validator(mode="after")
    def _grader_models(self) -> JobSpec:
        # a score_model grader asks the base or an adapter of the job's own namespace
        if self.method.reinforcement is None:
            return self
        from workers.training.graders import BASE_MODEL, parse_grader

        for model in sorted(parse_grader(self.method.reinforcement.grader).models):
            if model == BASE_MODEL:
                continue
            ref = parse_ref(model)
            if ref.namespace != self.namespace:
                raise ValueError(f"method.reinforcement.grader: model {model!r} must be "
                                 f"{BASE_MODEL!r} or an adapter of the job's namespace "
                                 f"{self.namespace!r}")  # fmt: skip
        return self

    @field_validator("init_adapter")
    @classmethod
    def _init(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        ref = parse_ref(v)  # InvalidReference is a ValueError: pydantic reports it on the field
        namespace = info.data.get("namespace")
        if namespace is not None and ref.namespace != namespace:
            raise ValueError(f"must be an adapter of the job's namespace {namespace!r}")
        return v

    def canonical_json(self) -> str:
        """Stable JSON of the spec (what idempotency compares: the key itself is not part)."""
        return json.dumps(self.compared(), sort_keys=True, separators=(",", ":"))

    def compared(self) -> dict[str, Any]:
        """The spec as stored and compared for idempotency: everything but the key."""
        return self.model_dump(mode="json", exclude={"idempotency_key"})


class IdempotencyKeyError(SpecError):
    """The idempotency keys of a submission are unusable (a request error, not a spec one)."""


def idempotency_key(header: str | None, body: str | None) -> str | None:
    """The one idempotency key of a submission, as AWS client tokens behave.

    Raises:
        IdempotencyKeyError: an empty key (it would silently mean none), or a header key and a
            body key that differ (which one did the client mean?).
    """
    if header is not None and not header.strip():
        raise IdempotencyKeyError("idempotency_key", "the Idempotency-Key header must not be "
                                  "empty")  # fmt: skip
    if header is not None and body is not None and header != body:
        raise IdempotencyKeyError("idempotency_key", "the Idempotency-Key header and the "
                                  "body's idempotency_key differ; send one, or the same in "
                                  "both")  # fmt: skip
    return header if header is not None else body


def _first_error(exc: ValidationError) -> SpecError:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    message = message.removeprefix("Value error, ")
    return SpecError(path, message)


def deprecated_spellings(data: Any) -> list[str]:
    """Warnings for old spellings a spec still uses (it is read as the new one)."""
    lora = data.get("lora") if isinstance(data, dict) else None
    if isinstance(lora, dict) and "method" in lora and "variant" not in lora:
        return [f"lora.method is now lora.variant (read as variant: {lora['method']}); "
                "`method` names the training method (supervised, dpo), as at OpenAI"]  # fmt: skip
    return []


def check_lora_variant(
    variant: str, base_quantization: str = "none", *, r: int = 8, target_r: int | None = None
) -> LoraSpec:
    """The spec's rule for ``lora.variant``, ``target_r`` and ``base_quantization``, for
    ``lorafleet train``; returns the checked ``lora`` part.

    Raises:
        SpecError: naming the ``lora.…`` field.
    """
    try:
        return LoraSpec.model_validate({"variant": variant, "r": r, "target_r": target_r,
                                        "base_quantization": base_quantization})  # fmt: skip
    except ValidationError as exc:
        err = _first_error(exc)
        message = str(err).removeprefix(f"{err.field}: ") if err.field else str(err)
        raise SpecError(f"lora.{err.field}" if err.field else "lora", message) from None


def parse_spec(data: Any) -> JobSpec:
    """Validate a decoded spec (a dict).

    Raises:
        SpecError: naming the first offending field's path.
    """
    if not isinstance(data, dict):
        raise SpecError("", "a job spec must be a mapping of fields")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a mapping (not yet validated).

    Raises:
        SpecError: unreadable file, malformed YAML/JSON, or not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError("", f"cannot read {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            "", f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise SpecError("", "a job spec must be a mapping of fields")
    return data


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML or JSON spec file (its inputs must already be ids/names).

    Raises:
        SpecError: unreadable file, malformed YAML/JSON, or an invalid field.
    """
    return parse_spec(read_spec_file(path))
