"""Packed training at step level: K jobs' rows in one packed step vs the same rows as K solo
steps (each job its own model, as K separate runs would hold it).

For K = 1, 2, 4, 8 jobs (each 4 rows × up to 64 tokens, rank 8 on q/v, different seeds), the
two systems run the same steps in paired rounds (solo, packed, solo, packed, …); the ratio is
solo time / packed time = packed aggregate tokens/s over solo (target ≥ 1.2× at K = 4 on this
CPU). One torch thread.

    python bench/packed_training.py [--rounds 9] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import environment, median, write_result

KS = (1, 2, 4, 8)


def _jobs(k: int) -> list[tuple[Any, Any]]:
    from workers.lora import LoraConfig
    from workers.training.recipe import TrainConfig

    return [(LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
             TrainConfig(max_steps=10_000, batch_size=4, seq_len=64, seed=i, warmup_steps=0))
            for i in range(k)]  # fmt: skip


def bench(base_dir: Path, rounds: int, steps: int) -> dict[str, Any]:
    from workers.base_model import load_base
    from workers.datasets import load_dataset
    from workers.demo_task import TRAIN_FILE
    from workers.training.packed import PackedRecipe
    from workers.training.recipe import LoraFinetuneRecipe

    out: dict[str, Any] = {}
    for k in KS:
        jobs = _jobs(k)
        _, tok = load_base(base_dir)
        data = load_dataset(TRAIN_FILE, tok, seq_len=64)
        solos = []
        for lora, cfg in jobs:
            model, _ = load_base(base_dir)
            r = LoraFinetuneRecipe(model, lora, cfg, pad_id=tok.pad_token_id)
            r.setup()
            solos.append(r)
        model, _ = load_base(base_dir)
        pack = PackedRecipe(model, pad_id=tok.pad_token_id)
        for i, (lora, cfg) in enumerate(jobs):
            pack.add(f"j{i}", lora, cfg, data)
        for r in solos:  # warm up both
            r.train_step(data)
        pack.step()
        ratios, solo_tps, packed_tps = [], [], []
        for _ in range(rounds):
            t0, tokens = time.perf_counter(), 0
            for _ in range(steps):
                for r in solos:
                    tokens += r.train_step(data).tokens
            solo_s = time.perf_counter() - t0
            t0, ptokens = time.perf_counter(), 0
            for _ in range(steps):
                ptokens += sum(rep.tokens for rep in pack.step().values())
            packed_s = time.perf_counter() - t0
            solo_tps.append(tokens / solo_s)
            packed_tps.append(ptokens / packed_s)
            ratios.append((ptokens / packed_s) / (tokens / solo_s))
        out[f"K={k}"] = {"ratio": median(ratios), "min": min(ratios), "max": max(ratios),
                         "solo_tokens_per_s": median(solo_tps),
                         "packed_tokens_per_s": median(packed_tps), "rounds": rounds,
                         "steps_per_round": steps}  # fmt: skip
        print(f"K={k}: packed/solo tokens/s {median(ratios):.2f}× "
              f"({min(ratios):.2f}–{max(ratios):.2f})", flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from workers.tiny_base import TinySpec, create_tiny_base

    work = Path(tempfile.mkdtemp(prefix="lorafleet-packed-"))
    base = create_tiny_base(work / "base", TinySpec(layers=4, hidden=256, heads=4, vocab=2048))
    results = {"environment": environment(threads=1),
               "model": {"layers": 4, "hidden": 256, "vocab": 2048},
               "step": bench(base, args.rounds, args.steps)}  # fmt: skip
    print(f"wrote {write_result('packed_training', results)}")


if __name__ == "__main__":
    main()
