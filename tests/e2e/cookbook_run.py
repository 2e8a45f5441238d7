"""Run one tinker-cookbook recipe (0.5.8, unmodified) against a Tinker-compatible server,
offline: ``python cookbook_run.py RECIPE BASE_URL TOKENIZER_DIR LOG_DIR``.

The key comes from ``TINKER_API_KEY``. Offline means three substitutions a user without
internet access makes too: the cookbook's tokenizer registry gets the local tokenizer under
the recipe's model name, ``datasets.load_dataset`` answers the recipe's dataset name with a
few local rows of the same shape, and DPO reads a local comparisons JSONL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
from transformers import AutoTokenizer

MODEL = "meta-llama/Llama-3.2-1B"  # in the cookbook's model registry (role_colon renderer)


def _local_datasets(name: str, *args: object, **kwargs: object) -> datasets.DatasetDict:
    if name == "HuggingFaceH4/no_robots":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"Write the number {i} in words."},
                    {"role": "assistant", "content": w},
                ]
            }
            for i, w in enumerate(["zero", "one", "two", "three", "four", "five"])
        ]
    elif name == "openai/gsm8k":
        # a question that hands over its answer: a small model copies it in some samples and
        # not in others, so each group has rewards to tell apart
        rows = [
            {"question": "Copy this exactly: \\boxed{3}", "answer": "Copied.\n#### 3"}
            for _ in range(8)
        ]
    else:
        raise ValueError(f"no local copy of dataset {name}")
    data = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({"train": data, "test": data})


def main() -> None:
    recipe, base_url, tokenizer_dir, log_dir = sys.argv[1:5]
    from tinker_cookbook import tokenizer_utils

    tokenizer_utils.register_tokenizer(MODEL, lambda: AutoTokenizer.from_pretrained(tokenizer_dir))
    datasets.load_dataset = _local_datasets  # type: ignore[assignment]
    common = {"base_url": base_url, "log_path": log_dir, "model_name": MODEL, "lora_rank": 4,
              "max_steps": 2, "save_every": 0}  # fmt: skip
    if recipe == "sl_loop":
        from tinker_cookbook.recipes import sl_loop

        sl_loop.main(sl_loop.Config(**common, batch_size=2, max_length=128))
    elif recipe == "rl_loop":
        from tinker_cookbook.recipes import rl_loop

        rl_loop.main(rl_loop.Config(**common, batch_size=2, group_size=12, max_tokens=24))
    elif recipe == "dpo":
        from tinker_cookbook.preference import train_dpo
        from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
        from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        path = Path(log_dir) / "comparisons.jsonl"
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for q, good, bad in (("Greet me.", "Hello!", "Go away."),
                                 ("Thank me.", "Thank you!", "No."),
                                 ("Say yes.", "Yes.", "Never."),
                                 ("Be kind.", "You are great.", "Whatever.")):  # fmt: skip
                fh.write(json.dumps({"comparison": {
                    "prompt_conversation": [{"role": "user", "content": q}],
                    "completion_A": [{"role": "assistant", "content": good}],
                    "completion_B": [{"role": "assistant", "content": bad}]},
                    "label": "A"}) + "\n")  # fmt: skip
        builder = DPODatasetBuilderFromComparisons(
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=MODEL, renderer_name="role_colon", max_length=128,
                batch_size=2),
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(path)),
        )  # fmt: skip
        train_dpo.main(train_dpo.Config(**common, recipe_name="dpo", dataset_builder=builder,
                                        renderer_name="role_colon", eval_every=0,
                                        infrequent_eval_every=0))  # fmt: skip
    else:
        raise SystemExit(f"unknown recipe {recipe}")


if __name__ == "__main__":
    main()
