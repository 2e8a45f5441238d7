"""Fine-tuning methods as OpenAI names them — supervised, dpo, reinforcement — and what each
means to the trainer: its objective and how its file's rows become items.

The one owner of that mapping: the job spec, the CLI and the workers all go through
``Method``. Its dict form is OpenAI's ``method`` object
(``{"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}``,
``{"type": "reinforcement", "reinforcement": {"grader": {…}, "hyperparameters":
{"group_size": 4, "max_new_tokens": 32}}}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.datasets import load_dataset
from workers.errors import TrainingError
from workers.training.objectives import Dpo, Objective, Supervised

MethodType = Literal["supervised", "dpo", "reinforcement"]
METHOD_TYPES: tuple[str, ...] = ("supervised", "dpo", "reinforcement")
DEFAULT_BETA = 0.1
MAX_GROUP = 64
MAX_NEW_TOKENS = 4096


def _int_in(value: Any, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TrainingError(f"{where}: must be an integer in [{lo}, {hi}], got {value!r}")
    return value


@dataclass(frozen=True)
class Method:
    """A method and its hyperparameters.

    Attributes:
        type: supervised, dpo or reinforcement.
        beta: DPO's β (how far the policy may move from the reference).
        grader: reinforcement's grader (OpenAI's shapes, ``workers.training.graders``).
        group_size: reinforcement's samples per prompt (GRPO's group).
        max_new_tokens: reinforcement's longest sampled answer.
    """

    type: str = "supervised"
    beta: float = DEFAULT_BETA
    grader: dict[str, Any] | None = field(default=None, compare=False)
    group_size: int = 4
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.type not in METHOD_TYPES:
            raise TrainingError(f"method: unknown type {self.type!r}; use one of "
                                f"{', '.join(METHOD_TYPES)}")  # fmt: skip
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta)
                and self.beta > 0):  # fmt: skip
            raise TrainingError(f"method.dpo.hyperparameters.beta: must be > 0, got {self.beta!r}")
        if self.type == "reinforcement":
            where = "method.reinforcement"
            if self.grader is None:
                raise TrainingError(f"{where}.grader: a reinforcement job needs a grader")
            _int_in(self.group_size, 2, MAX_GROUP, f"{where}.hyperparameters.group_size")
            _int_in(self.max_new_tokens, 1, MAX_NEW_TOKENS,
                    f"{where}.hyperparameters.max_new_tokens")  # fmt: skip
            self.parsed_grader()  # refuses an unknown type, operation or metric now

    def parsed_grader(self) -> Any:
        """The grader, validated (``GraderError`` names the bad part)."""
        from workers.training.graders import parse_grader

        return parse_grader(self.grader, "method.reinforcement.grader")

    def objective(self) -> Objective:
        """The loss this method trains with."""
        if self.type == "dpo":
            return Dpo(beta=float(self.beta))
        if self.type == "reinforcement":
            from workers.training.reinforce import Reinforcement

            return Reinforcement(self.parsed_grader(), group_size=self.group_size,
                                 max_new_tokens=self.max_new_tokens)  # fmt: skip
        return Supervised()

    def load(self, path: str | Path, tokenizer: Any, *, seq_len: int,
             name: str | None = None) -> list[Any]:  # fmt: skip
        """The items of a training or evaluation file (``name``: how errors call it).

        Raises:
            DatasetError: a row this method cannot train on (``file:line: reason``);
            GraderError: a grader template naming a field a row lacks.
        """
        if self.type == "dpo":
            from workers.method_data import load_preferences

            return list(load_preferences(path, tokenizer, seq_len=seq_len, name=name))
        if self.type == "reinforcement":
            from workers.method_data import load_prompts
            from workers.training.graders import check_fields
            from workers.training.reinforce import prompt_items

            shown = name or Path(path).name
            rows = load_prompts(path, name=name)
            check_fields(self.parsed_grader(), rows, shown)
            return list(prompt_items(rows, tokenizer, seq_len=seq_len,
                                     max_new_tokens=self.max_new_tokens, name=shown))  # fmt: skip
        return list(load_dataset(path, tokenizer, seq_len=seq_len, name=name))

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's ``method`` object."""
        if self.type == "dpo":
            return {"type": "dpo", "dpo": {"hyperparameters": {"beta": self.beta}}}
        if self.type == "reinforcement":
            return {"type": "reinforcement", "reinforcement": {
                "grader": self.grader,
                "hyperparameters": {"group_size": self.group_size,
                                    "max_new_tokens": self.max_new_tokens}}}  # fmt: skip
        return {"type": self.type}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Method:
        """Inverse of ``as_dict`` (None: supervised)."""
        if not d:
            return cls()
        kind = d.get("type", "supervised")
        section = (d.get(kind) or {}) if isinstance(kind, str) else {}
        params = section.get("hyperparameters") or {}
        return cls(type=kind, beta=params.get("beta", DEFAULT_BETA), grader=section.get("grader"),
                   group_size=params.get("group_size", 4),
                   max_new_tokens=params.get("max_new_tokens", 32))  # fmt: skip
