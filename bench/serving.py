"""Serving throughput with many adapters in one batch (the batched multi-adapter layer).

Same base, same prompts, same decode length, in one process:
- ours: one batch of 64 prompts whose rows use 1, 4, 16 or 64 distinct adapters (slots),
  decoded greedily in one batched pass per step (``generate_mixed``);
- PEFT: the same 64 prompts with 16 adapters through PEFT's mixed-batch inference
  (``generate(..., adapter_names=[...])``).
Ratios: ours(16) / ours(1) (target ≥ 0.8) and ours(16) / PEFT(16) (target ≥ 2).

    python bench/serving.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

BATCH, NEW_TOKENS, RANK = 64, 16, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter
    from workers.serving.generate import generate_mixed
    from workers.serving.multi_lora import to_multi_lora
    from workers.tiny_base import TinySpec, create_tiny_base

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-serve-"))
    base_dir = create_tiny_base(work / "base", TinySpec(layers=4, hidden=256, heads=8))
    n_adapters = 64
    for i in range(n_adapters):
        model, _ = load_base(base_dir)
        torch.manual_seed(i)
        cfg = LoraConfig(r=RANK, alpha=16, target_modules=TARGETS)
        inject_lora(model, cfg)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.weight.normal_(0, 0.05)
        save_adapter(model, cfg, work / f"ad{i}")
        if i == 0:
            paths = list(lora_modules(model))
    base, tok = load_base(base_dir)
    layers = to_multi_lora(base, paths, n_slots=n_adapters, max_rank=RANK)
    for i in range(n_adapters):
        model, _ = load_base(base_dir)
        from workers.lora import load_adapter

        load_adapter(model, work / f"ad{i}")
        for path, lora in lora_modules(model).items():
            layers[path].load_slot(i, lora.lora_A.weight, lora.lora_B.weight, lora.scaling)
    prompts = [f"spell {i % 10} {(i * 7) % 10} =" for i in range(BATCH)]

    def ours(distinct: int) -> float:
        slots = [i % distinct for i in range(BATCH)]
        t0 = time.perf_counter()
        generate_mixed(
            base, tok, layers, prompts, slots, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
        return time.perf_counter() - t0

    peft_base, _ = load_base(base_dir)
    peft_model = PeftModel.from_pretrained(peft_base, work / "ad0", adapter_name="a0")
    for i in range(1, 16):
        peft_model.load_adapter(work / f"ad{i}", adapter_name=f"a{i}")
    peft_model.eval()

    def peft16() -> float:
        names = [f"a{i % 16}" for i in range(BATCH)]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(**enc, adapter_names=names, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tok.pad_token_id)  # fmt: skip
        return time.perf_counter() - t0

    del get_peft_model, PeftConfig
    times: dict[str, list[float]] = {k: [] for k in ("1", "4", "16", "64", "peft16")}
    for _ in range(3):  # alternating rounds
        for k in ("1", "4", "16", "64"):
            times[k].append(ours(int(k)))
        times["peft16"].append(peft16())
    tokens = BATCH * NEW_TOKENS
    tps = {k: tokens / median(v) for k, v in times.items()}
    results: dict[str, Any] = {
        "environment": environment(threads=1),
        "batch": BATCH,
        "new_tokens": NEW_TOKENS,
        "tokens_per_s": tps,
        "ratios": {
            "ours16_vs_ours1": tps["16"] / tps["1"],
            "ours16_vs_peft16": tps["16"] / tps["peft16"],
        },
        "note": "every row decodes exactly new_tokens (min_new_tokens = max_new_tokens)",
    }
    print("tokens/s: " + ", ".join(f"{k} adapters {v:,.0f}" for k, v in tps.items()))
    print(
        f"16 vs 1 adapter: {results['ratios']['ours16_vs_ours1']:.3f}×; ours vs PEFT at 16: "
        f"{results['ratios']['ours16_vs_peft16']:.2f}×"
    )
    print(f"wrote {write_result('serving', results)}")


if __name__ == "__main__":
    main()
