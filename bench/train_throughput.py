"""Training throughput of our LoRA step vs PEFT's, full fine-tuning, and the frozen-base floor.

All four run in one process on the same model shape and batch, with alternating rounds (so
drift in machine speed hits every contender alike) and a fixed thread count. Peak memory is
measured per contender in a fresh subprocess (peak RSS above the post-import baseline), since
CPU PyTorch has no allocator statistics.

    python bench/train_throughput.py [--rounds 5 --steps 4 --threads 1]

Contenders (tokens/s = batch × seq / step time):
- ours:  lorafleet's training step as every job runs it — the training core's
         ``Trainer.step`` (``workers/training/core.py``) with the supervised objective: batch
         collation, LoraLinear (one fused autograd node per layer), per-token log-probabilities
         from the frozen head in chunks (no full logits kept), gradient clipping, AdamW on
         LoRA params;
- ours_hf_loss: our LoRA layers with Hugging Face's standard loss (isolates the layer's share);
- peft:  peft.get_peft_model with the same LoRA config and AdamW;
- full:  every parameter trainable, AdamW on all of them;
- floor: frozen base, forward + backward to the input embeddings, no LoRA, no optimizer —
         the least work any LoRA step must do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, rss_kib, write_result

SHAPE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32000,  # Llama-2's vocabulary: realistic parameter share of embeddings and head
    max_position_embeddings=512,
)
CONTENDERS = ("ours", "ours_hf_loss", "peft", "full", "floor")


def build(kind: str, targets: Any, r: int, batch: int, seq: int) -> tuple[Any, Any, dict]:
    """Model, optimizer (or None) and a fixed batch for one contender."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g)
    data: dict[str, Any] = {"input_ids": ids, "labels": ids}
    opt = None
    if kind == "ours":  # the one training core, as a job runs it
        from workers.datasets import Example
        from workers.lora import LoraConfig
        from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

        recipe = LoraFinetuneRecipe(model, LoraConfig(r=r, alpha=2 * r, target_modules=targets),
                                    TrainConfig(max_steps=1 << 30, batch_size=batch, seq_len=seq,
                                                lr=1e-4, warmup_steps=0), pad_id=0)  # fmt: skip
        recipe.setup()
        rows = [Example(tuple(row), tuple(row)) for row in ids.tolist()]
        data = {"recipe": recipe, "items": rows}
    elif kind == "ours_hf_loss":
        from workers.lora import LoraConfig, inject_lora, lora_parameters

        inject_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=targets))
        opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    elif kind == "peft":
        from peft import LoraConfig as PeftConfig
        from peft import get_peft_model

        t = targets if isinstance(targets, str) else list(targets)
        model = get_peft_model(
            model, PeftConfig(r=r, lora_alpha=2 * r, target_modules=t, init_lora_weights="gaussian")
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif kind == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif kind == "floor":
        model.requires_grad_(False)
        emb = model.get_input_embeddings()(ids).detach()
        data = {"inputs_embeds": emb.requires_grad_(True), "labels": ids}
    return model, opt, data


def step(model: Any, opt: Any, data: dict) -> None:
    if "recipe" in data:  # lorafleet's training step: one step of the training core
        data["recipe"].train_step(data["items"])
        return
    loss = model(**data).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif "inputs_embeds" in data:
        data["inputs_embeds"].grad = None


def probe_memory(kind: str, targets: Any, r: int, batch: int, seq: int) -> float:
    """Peak RSS growth (MiB) of building and training ``kind``; run in a fresh process.

    Writing 5 to ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current RSS, so the
    imports' own peak does not hide the contender's.
    """
    import peft  # noqa: F401 - imported before the baseline, like torch

    import workers.lora  # noqa: F401

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = rss_kib("VmRSS")
    m, o, d = build(kind, targets, r, batch, seq)
    for _ in range(3):
        step(m, o, d)
    return (rss_kib("VmHWM") - base) / 1024


def measure_memory(kind: str, targets: Any, r: int, batch: int, seq: int, threads: int) -> float:
    """``probe_memory`` in a subprocess (a process's peak cannot be un-peaked for others)."""
    cmd = [
        sys.executable,
        __file__,
        "--probe",
        kind,
        "--probe-targets",
        json.dumps(targets),
        "--r",
        str(r),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(targets: Any, r: int, batch: int, seq: int, rounds: int, steps: int) -> dict[str, Any]:
    built = {k: build(k, targets, r, batch, seq) for k in CONTENDERS}
    for m, o, d in built.values():  # warm-up: allocator, kernels, optimizer state
        step(m, o, d)
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for _ in range(rounds):
        for kind in CONTENDERS:
            m, o, d = built[kind]
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m, o, d)
            times[kind].append((time.perf_counter() - t0) / steps)
    tokens = batch * seq
    tps = {k: tokens / median(v) for k, v in times.items()}
    return {
        "tokens_per_s": tps,
        "step_s_median": {k: median(v) for k, v in times.items()},
        "ratios": {
            "ours_vs_peft": tps["ours"] / tps["peft"],
            "ours_layer_only_vs_peft": tps["ours_hf_loss"] / tps["peft"],
            "floor_time_ratio": tps["floor"] / tps["ours"],  # our step time / floor step time
            "ours_vs_full": tps["ours"] / tps["full"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--probe", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--probe-targets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        targets = json.loads(args.probe_targets)
        targets = targets if isinstance(targets, str) else tuple(targets)
        print(probe_memory(args.probe, targets, args.r, args.batch, args.seq))
        return
    results: dict[str, Any] = {
        "environment": environment(args.threads),
        "shape": SHAPE,
        "batch": args.batch,
        "seq": args.seq,
        "r": args.r,
        "targets": {},
        "targets_met": {},
    }
    for name, targets in (("q_proj,v_proj", ("q_proj", "v_proj")), ("all-linear", "all-linear")):
        res = run(targets, args.r, args.batch, args.seq, args.rounds, args.steps)
        mem = {
            k: measure_memory(k, targets, args.r, args.batch, args.seq, args.threads)
            for k in ("ours", "full")
        }
        res["peak_rss_growth_mib"] = mem
        res["ratios"]["memory_ours_vs_full"] = mem["ours"] / mem["full"]
        results["targets"][name] = res
        ratios = res["ratios"]
        results["targets_met"][name] = {
            "ours_vs_peft>=1.05": ratios["ours_vs_peft"] >= 1.05,
            "floor_time_ratio<=1.15": ratios["floor_time_ratio"] <= 1.15,
            "ours_vs_full>=1.3": ratios["ours_vs_full"] >= 1.3,
            "memory_ours_vs_full<=0.5": ratios["memory_ours_vs_full"] <= 0.5,
        }
        print(
            f"[{name}] tokens/s: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in res["tokens_per_s"].items())
        )
        print(
            f"[{name}] ours/peft {ratios['ours_vs_peft']:.3f}× (layer only "
            f"{ratios['ours_layer_only_vs_peft']:.3f}×)  ours step/floor step "
            f"{ratios['floor_time_ratio']:.3f}×  ours/full {ratios['ours_vs_full']:.3f}×  "
            f"memory ours/full {ratios['memory_ours_vs_full']:.3f}× "
            f"({mem['ours']:.0f} vs {mem['full']:.0f} MiB)"
        )
    path = write_result("train_throughput", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
