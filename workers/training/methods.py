"""Fine-tuning methods as OpenAI names them — supervised, dpo, reinforcement — and what each
means to the trainer: its objective and how its file's rows become items.

The one owner of that mapping: the job spec, the CLI and the workers all go through
``Method``. Its dict form is OpenAI's ``method`` object
(``{"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from workers.datasets import load_dataset
from workers.errors import TrainingError
from workers.training.objectives import Dpo, Objective, Supervised

MethodType = Literal["supervised", "dpo", "reinforcement"]
METHOD_TYPES: tuple[str, ...] = ("supervised", "dpo", "reinforcement")
DEFAULT_BETA = 0.1


@dataclass(frozen=True)
class Method:
    """A method and its hyperparameters.

    Attributes:
        type: supervised, dpo or reinforcement.
        beta: DPO's β (how far the policy may move from the reference).
    """

    type: str = "supervised"
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if self.type not in METHOD_TYPES:
            raise TrainingError(f"method: unknown type {self.type!r}; use one of "
                                f"{', '.join(METHOD_TYPES)}")  # fmt: skip
        if self.type == "reinforcement":
            raise TrainingError("method: reinforcement fine-tuning is not available yet")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta)
                and self.beta > 0):  # fmt: skip
            raise TrainingError(f"method.dpo.hyperparameters.beta: must be > 0, got {self.beta!r}")

    def objective(self) -> Objective:
        """The loss this method trains with."""
        if self.type == "dpo":
            return Dpo(beta=float(self.beta))
        return Supervised()

    def load(self, path: str | Path, tokenizer: Any, *, seq_len: int,
             name: str | None = None) -> list[Any]:  # fmt: skip
        """The items of a training or evaluation file (``name``: how errors call it).

        Raises:
            DatasetError: a row this method cannot train on (``file:line: reason``).
        """
        if self.type == "dpo":
            from workers.method_data import load_preferences

            return list(load_preferences(path, tokenizer, seq_len=seq_len, name=name))
        return list(load_dataset(path, tokenizer, seq_len=seq_len, name=name))

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's ``method`` object."""
        if self.type == "dpo":
            return {"type": "dpo", "dpo": {"hyperparameters": {"beta": self.beta}}}
        return {"type": self.type}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Method:
        """Inverse of ``as_dict`` (None: supervised)."""
        if not d:
            return cls()
        kind = d.get("type", "supervised")
        params = ((d.get(kind) or {}).get("hyperparameters") or {}) if isinstance(kind, str) else {}
        return cls(type=kind, beta=params.get("beta", DEFAULT_BETA))
