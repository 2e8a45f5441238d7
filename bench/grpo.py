"""GRPO rollout throughput: sampling in the trainer vs the serving engine alone.

SmolLM2-135M-Instruct (float32), one adapter (LoRA r=16 on q,k,v,o, B randomised so it is
not the base), 4 prompts × a group of 8 samples, 32 new tokens each, temperature 1, the
sampled tokens' log-probabilities on. Two systems on the same rows and seeds, interleaved in
paired rounds (A B A B …, 5 rounds after a warm-up each):

- ``trainer``: the reinforcement objective's rollout path — ``Trainer.sample`` decoding with
  the adapter as the trainer holds it (``LoraLinear`` layers, in eval mode);
- ``engine``: the serving engine's batch decoder on the same model with the adapter in a
  ``MultiLoraLinear`` slot, as ``lorafleet serve`` holds it.

Both run ``decode_batch`` (one sampling implementation); the figure is what the trainer's
layers cost against the serving layers. Goal (issue 27): trainer/engine tokens/s ≥ 0.9×.
Writes ``bench/results/grpo.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result
from bench.serving_features import _base

ROUNDS, PROMPTS, GROUP, NEW = 5, 4, 8, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rows(tok: Any) -> list[Any]:
    from workers.serving.decode import DecodeRow

    chats = [[{"role": "user", "content": f"Count from {i} to {i + 9}."}] for i in range(PROMPTS)]
    prompts = [tok.apply_chat_template(c, tokenize=True, return_dict=False,
                                       add_generation_prompt=True) for c in chats]  # fmt: skip
    return [DecodeRow(prompt_ids=list(p), max_new_tokens=NEW, min_new_tokens=NEW,
                      temperature=1.0, seed=17 * i + j, logprobs=0, deltas=False)
            for i, p in enumerate(prompts) for j in range(GROUP)]  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    from workers.base_model import load_base
    from workers.lora import LoraConfig, lora_modules
    from workers.serving.multi_lora import to_multi_lora
    from workers.serving.stepper import decode_batch
    from workers.training.objectives import Supervised
    from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-grpo-"))
    base_dir, model_name = _base(work)
    model, tok = load_base(base_dir)
    lora = LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    recipe = LoraFinetuneRecipe(model, lora, TrainConfig(max_steps=1, batch_size=1),
                                pad_id=tok.pad_token_id, objective=Supervised(),
                                tokenizer=tok)  # fmt: skip
    recipe.setup()
    with torch.no_grad():
        for p in recipe.params:
            p.add_(torch.randn_like(p) * 0.02)
    member = recipe._member()
    served, _ = load_base(base_dir)  # the engine's copy: the same adapter in a slot
    layers = to_multi_lora(served, list(lora_modules(model)), n_slots=4, max_rank=16)
    for path, layer in lora_modules(model).items():
        layers[path].load_slot(0, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    served.eval()
    rows = _rows(tok)
    slotted = [dataclasses.replace(r, slot=0) for r in rows]

    def trainer() -> int:
        return sum(len(o.token_ids) for o in recipe.trainer.sample(member, rows))

    def engine() -> int:
        with torch.no_grad():
            return sum(len(o.token_ids) for o in decode_batch(served, tok, layers, slotted))

    systems = {"trainer": trainer, "engine": engine}
    for fn in systems.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(ROUNDS):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    r = [a / b for a, b in zip(rates["trainer"], rates["engine"], strict=True)]
    result = {
        "model": model_name,
        "environment": environment(1),
        "rows": len(rows),
        "new_tokens": NEW,
        "rounds": ROUNDS,
        "tokens_per_s": {k: median(v) for k, v in rates.items()},
        "trainer_over_engine": {"median": median(r), "min": min(r), "max": max(r)},
    }
    path = write_result("grpo", result)
    t = result["trainer_over_engine"]
    print(f"GRPO rollout tokens/s, trainer / serving engine: {t['median']:.2f}× "
          f"({t['min']:.2f}–{t['max']:.2f}) → {path}")  # fmt: skip


if __name__ == "__main__":
    main()
