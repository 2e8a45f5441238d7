"""AdaLoRA against LoRA at an equal trainable-parameter budget on the demo task.

LoRA r = 8 on q/v against AdaLoRA starting at r = 12 whose budget ends at 8 per layer on
average (the same final number of trained directions, spent where the importance scores put
them), 300 steps each, every method at its best learning rate of {3e-3, 1e-2, 2e-2} (AdaLoRA's
SVD form starts from small P, Q and zero Λ and wants a larger one). Deterministic: one run is
the figure. Writes ``bench/results/adalora.json``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_result
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE
from workers.lora import LoraConfig
from workers.lora.config import AdaLoraSchedule
from workers.lora.io import parse_adapter_keys, read_adapter_weights
from workers.tiny_base import create_tiny_base
from workers.training.recipe import TrainConfig
from workers.training.single import train_single

STEPS, LRS = 300, (3e-3, 1e-2, 2e-2)


def _final_params(adapter: Path) -> tuple[int, dict[str, int]]:
    """Trained numbers that remain: r·(in + out) per LoRA layer; AdaLoRA: kept triplets."""
    total, ranks = 0, {}
    for path, t in parse_adapter_keys(read_adapter_weights(adapter)).items():
        a, b = t["A"], t["B"]
        kept = int((t["E"] != 0).sum()) if "E" in t else a.shape[0]
        ranks[path] = kept
        total += kept * (a.shape[1] + b.shape[0] + (1 if "E" in t else 0))
    return total, ranks


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-adalora-"))
    base = create_tiny_base(work / "base")
    methods = {
        "lora": LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        "adalora": LoraConfig(r=12, alpha=16, target_modules=("q_proj", "v_proj"),
                              adalora=AdaLoraSchedule.for_steps(8, STEPS)),
    }  # fmt: skip
    runs: dict[str, Any] = {}
    for name, lora in methods.items():
        runs[name] = []
        for lr in LRS:
            out = work / f"{name}-{lr}"
            res = train_single(base_dir=base, data_path=TRAIN_FILE, eval_path=HELDOUT_FILE,
                               out_dir=out, lora=lora,
                               train=TrainConfig(max_steps=STEPS, lr=lr, batch_size=16,
                                                 seq_len=64, eval_every=0, warmup_steps=10),
                               ).result  # fmt: skip
            params, ranks = _final_params(out)
            runs[name].append({"lr": lr, "eval_loss_final": res.eval_loss_final,
                               "final_params": params, "ranks": ranks})  # fmt: skip
            print(f"{name} lr {lr:g}: eval loss {res.eval_loss_final:.4f}, {params:,} params")
    best = {n: min(r, key=lambda x: x["eval_loss_final"]) for n, r in runs.items()}
    ratio = best["adalora"]["final_params"] / best["lora"]["final_params"]
    payload = {"environment": environment(1), "steps": STEPS, "runs": runs, "best": best,
               "params_ratio": ratio}  # fmt: skip
    path = write_result("adalora", payload)
    print(f"best: LoRA {best['lora']['eval_loss_final']:.4f} (lr {best['lora']['lr']:g}) · "
          f"AdaLoRA {best['adalora']['eval_loss_final']:.4f} (lr {best['adalora']['lr']:g}), "
          f"params {payload['params_ratio']:.3f}×; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
