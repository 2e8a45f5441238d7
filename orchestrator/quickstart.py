"""The main job on one laptop: tiny base → LoRA fine-tune → base vs adapter → merge check.

``make quickstart`` runs this module. Every stage prints what it did and where its output
went; set-up is idempotent (an existing tiny base of the same spec is reused), so running it
twice works.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

console = Console()


@dataclass
class QuickstartResult:
    """What the quickstart measured."""

    base_dir: Path
    adapter_dir: Path
    merged_dir: Path
    base_exact_match: float
    adapter_exact_match: float
    eval_loss_initial: float
    eval_loss_final: float
    merged_equals_unmerged: bool
    max_logit_diff: float


def _ensure_tiny_base(base_dir: Path) -> bool:
    """Create the tiny base unless an identical one is already there; True if created."""
    from workers.tiny_base import create_tiny_base

    marker = base_dir / "lorafleet-tiny.json"
    if marker.is_file() and (base_dir / "model.safetensors").is_file():
        return False
    create_tiny_base(base_dir)
    marker.write_text(json.dumps({"spec": "default"}) + "\n")
    return True


def run_quickstart(*, home: Path | None = None, max_steps: int = 300) -> QuickstartResult:
    """Run every stage; returns the measurements (the caller decides what is a failure)."""
    from orchestrator.cli_common import train_progress
    from storage.settings import load_settings
    from workers.base_model import load_base
    from workers.datasets import load_dataset, read_jsonl
    from workers.demo_task import HELDOUT_FILE, TRAIN_FILE, exact_match
    from workers.generate import greedy_generate
    from workers.lora import LoraConfig, load_adapter, merge_lora
    from workers.merged_export import export_merged
    from workers.training.recipe import TrainConfig
    from workers.training.single import train_single

    root = (home or load_settings().home) / "quickstart"
    base_dir, adapter_dir, merged_dir = root / "tiny-base", root / "adapter", root / "merged"
    root.mkdir(parents=True, exist_ok=True)

    console.rule("[bold]1. base model")
    created = _ensure_tiny_base(base_dir)
    console.print(f"{'created' if created else 'reusing'} tiny Llama base at {base_dir}")

    console.rule("[bold]2. fine-tune a LoRA adapter (spell digits as words)")
    heldout = read_jsonl(HELDOUT_FILE)
    prompts = [r["prompt"] for r in heldout]
    refs = [r["completion"] for r in heldout]
    lora = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    train = TrainConfig(max_steps=max_steps, lr=3e-3, batch_size=16, seq_len=64, eval_every=50)
    with train_progress(max_steps) as on_report:
        out = train_single(
            base_dir=base_dir,
            data_path=TRAIN_FILE,
            eval_path=HELDOUT_FILE,
            out_dir=adapter_dir,
            lora=lora,
            train=train,
            on_report=on_report,
        )
    res = out.result
    console.print(
        f"eval loss {res.eval_loss_initial:.3f} → {res.eval_loss_final:.3f} "
        f"({res.tokens_per_s:,.0f} tokens/s); adapter at {adapter_dir}"
    )

    console.rule("[bold]3. base vs adapter on held-out prompts")
    model, tok = load_base(base_dir)
    base_out = greedy_generate(model, tok, prompts, max_new_tokens=8)
    load_adapter(model, adapter_dir)
    adapted_out = greedy_generate(model, tok, prompts, max_new_tokens=8)
    base_em, adapter_em = exact_match(base_out, refs), exact_match(adapted_out, refs)
    table = Table("prompt", "base", "adapter", "expected")
    for p, b, a, r in list(zip(prompts, base_out, adapted_out, refs, strict=True))[:6]:
        table.add_row(p, repr(b.strip())[:24], a.strip(), r.strip())
    console.print(table)
    console.print(
        f"exact match on {len(refs)} held-out prompts: base [bold]{base_em:.0%}[/], "
        f"adapter [bold]{adapter_em:.0%}[/]"
    )

    console.rule("[bold]4. merge for zero-overhead inference")
    examples = load_dataset(HELDOUT_FILE, tok, seq_len=64)[:16]
    from workers.training.batches import collate

    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        unmerged_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        merge_lora(model)
        merged_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    diff = float((merged_logits - unmerged_logits).abs().max())
    merged_out = greedy_generate(model, tok, prompts, max_new_tokens=8)
    export_merged(base_dir=base_dir, adapter_dir=adapter_dir, out_dir=merged_dir)
    same = merged_out == adapted_out and diff < 1e-4
    console.print(
        f"merged vs unmerged: max |Δlogit| {diff:.2e}, generations identical: "
        f"{merged_out == adapted_out}; plain merged model at {merged_dir}"
    )

    console.rule("[bold]where everything went")
    console.print(
        f"base      {base_dir}\nadapter   {adapter_dir} (PEFT format)\nmerged    {merged_dir}"
    )
    return QuickstartResult(
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        base_exact_match=base_em,
        adapter_exact_match=adapter_em,
        eval_loss_initial=float(res.eval_loss_initial or 0.0),
        eval_loss_final=float(res.eval_loss_final or 0.0),
        merged_equals_unmerged=same,
        max_logit_diff=diff,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; non-zero exit if the adapter is not clearly better or merge differs."""
    import argparse

    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(prog="quickstart", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    args = parser.parse_args(argv)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    result = run_quickstart(max_steps=args.steps)
    ok = (
        result.adapter_exact_match >= result.base_exact_match + 0.5
        and result.merged_equals_unmerged
    )
    verdict = "[bold green]quickstart passed" if ok else "[bold red]quickstart FAILED"
    console.print(f"{verdict}[/] in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
