"""Single-process fine-tuning: base directory + JSONL in, PEFT-format adapter + metrics out."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage.objects import file_sha256
from workers.base_model import load_base
from workers.lora import LoraConfig, save_adapter
from workers.training.core import summary as training_summary
from workers.training.methods import Method
from workers.training.recipe import LoraFinetuneRecipe, StepReport, TrainConfig, TrainResult

log = logging.getLogger(__name__)
METRICS_NAME = "metrics.json"


@dataclass
class TrainOutput:
    """Where the adapter went and how training went."""

    adapter_dir: Path
    result: TrainResult
    dataset_sha256: str


def train_single(
    *,
    base_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    lora: LoraConfig,
    train: TrainConfig,
    eval_path: str | Path | None = None,
    on_report: Callable[[StepReport], None] | None = None,
    device: str = "cpu",
    method: Method | None = None,
    init_adapter: str | Path | None = None,
    grader_models: dict[str, Path] | None = None,
) -> TrainOutput:
    """Train an adapter in this process and write it with ``metrics.json``.

    Without ``eval_path``, the eval loss is measured on up to 64 training rows (a sanity
    signal, not a generalisation estimate).

    Args:
        method: supervised (default) or dpo; the data file must be in its format.
        init_adapter: a PEFT-format adapter directory to start from (a warm start; ``lora``
            must be its config).
        grader_models: a score_model grader's adapters, ref → adapter directory.

    Raises:
        BaseModelError, DatasetError, TrainingError, LoraError: bad input, named in the message.
    """
    method = method or Method()
    model, tokenizer = load_base(base_dir, device=device)
    train_items = method.load(data_path, tokenizer, seq_len=train.seq_len)
    eval_items = (method.load(eval_path, tokenizer, seq_len=train.seq_len)
                  if eval_path is not None else train_items[:64])  # fmt: skip
    recipe = LoraFinetuneRecipe(model, lora, train, pad_id=tokenizer.pad_token_id,
                                device=torch.device(device), tokenizer=tokenizer,
                                objective=method.objective())  # fmt: skip
    recipe.setup(init_adapter=init_adapter)
    if grader_models:
        from workers.training.frozen_adapter import FrozenAdapter

        assert recipe.member is not None
        recipe.member.grader_models = {ref: FrozenAdapter.from_dir(path)
                                       for ref, path in grader_models.items()}  # fmt: skip
    result = recipe.train(train_items, eval_items, on_report=on_report)
    out = save_adapter(model, lora, out_dir, base_model_name_or_path=str(base_dir))
    digest = file_sha256(data_path)
    assert recipe.member is not None
    recipe.member.lora = lora
    extra: dict[str, Any] = {"dataset_sha256": digest, "method_config": method.as_dict()}
    if init_adapter is not None:
        extra["init_adapter"] = str(init_adapter)
    if recipe.quant is not None:  # the base's linear weights as held while training
        extra["base_linear_bytes"] = {"full": recipe.quant.bytes_before,
                                      "quantized": recipe.quant.bytes_after,
                                      "backend": recipe.quant.backend}  # fmt: skip
    metrics = training_summary(recipe.member, **extra)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("adapter written to %s", out)
    return TrainOutput(adapter_dir=out, result=result, dataset_sha256=digest)
