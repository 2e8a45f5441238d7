"""Commands that work on this machine's files: build a tiny base, LoRA arithmetic, train,
generate, merge. Their heavy imports (torch, transformers, Ray) happen inside them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from orchestrator.cli.common import (
    console,
    fmt_bytes,
    quiet_hf,
    train_progress,
    user_errors,
    warn,
)
from workers.errors import WorkerError


def _spec_targets(value: str) -> list[str] | str:
    """``--targets`` as the job spec writes it (``re:`` kept: the spec's own rule strips it)."""
    parsed = parse_targets(value)
    if isinstance(parsed, tuple):
        return list(parsed)
    return value.strip()


def parse_targets(value: str) -> tuple[str, ...] | str:
    """``q_proj,v_proj`` → names; ``all-linear``; ``re:<pattern>`` → a regular expression."""
    value = value.strip()
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if not names:
        raise WorkerError("--targets: give module names (q_proj,v_proj), all-linear or re:<regex>")
    return names


# -- base ---------------------------------------------------------------------------------
@user_errors
def base_create_tiny(
    out_dir: Path = typer.Argument(..., help="Directory to write the model to."),
    layers: int = typer.Option(2, help="Decoder layers."),
    hidden: int = typer.Option(128, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    vocab: int = typer.Option(512, help="Tokenizer vocabulary size."),
    seed: int = typer.Option(0, help="Weight seed."),
) -> None:
    """Build a small seeded Llama with a byte-level BPE tokenizer (Hugging Face format)."""
    quiet_hf()
    from workers.tiny_base import TinySpec, create_tiny_base

    spec = TinySpec(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seed=seed)
    out = create_tiny_base(out_dir, spec)
    console.print(f"tiny base written to [bold]{out}[/]")


# -- lora report -------------------------------------------------------------------------
@user_errors
def lora_report_cmd(
    base: Path | None = typer.Option(None, help="A local Hugging Face model directory."),
    preset: str | None = typer.Option(None, help="A shape preset instead: llama-7b, ..."),
    r: int = typer.Option(8, help="LoRA rank."),
    targets: str = typer.Option("q_proj,v_proj", help="Names, all-linear, or re:<regex>."),
) -> None:
    """Trainable parameters, adapter size and optimizer memory saved (no weights loaded)."""
    quiet_hf()
    from workers.base_model import load_base_config, meta_model
    from workers.lora import LoraConfig, match_target_modules
    from workers.lora.report import lora_report
    from workers.presets import preset_config

    if (base is None) == (preset is None):
        raise WorkerError("give exactly one of --base DIR or --preset NAME")
    config = load_base_config(base) if base is not None else preset_config(str(preset))
    lcfg = LoraConfig(r=r, target_modules=parse_targets(targets))
    model = meta_model(config)
    paths = match_target_modules(model, lcfg.target_modules)
    rep = lora_report(model, paths, r)
    largest = max(rep.modules, key=lambda m: m.full_params)

    table = Table(title=f"LoRA r={r} on {base or preset} ({targets})", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("adapted modules", f"{len(rep.modules):,}")
    table.add_row(
        f"largest module ({largest.out_features}×{largest.in_features})",
        f"{largest.full_params:,} → {largest.lora_params:,} params "
        f"({largest.reduction:,.0f}× fewer)",
    )
    table.add_row("trainable parameters", f"{rep.trainable_params:,}")
    table.add_row("base parameters", f"{rep.base_params:,}")
    table.add_row("fraction of base", f"{rep.fraction_of_base:.4%}")
    table.add_row("adapter size fp16", fmt_bytes(rep.adapter_bytes(2)))
    table.add_row("adapter size fp32", fmt_bytes(rep.adapter_bytes(4)))
    table.add_row("AdamW state, full fine-tune", fmt_bytes(rep.optimizer_bytes_full))
    table.add_row("AdamW state, LoRA", fmt_bytes(rep.optimizer_bytes_lora))
    table.add_row("optimizer memory saved", fmt_bytes(rep.optimizer_bytes_saved))
    console.print(table)


# -- train --------------------------------------------------------------------------------
@user_errors
def train_cmd(
    base: Path = typer.Option(..., help="Base model directory."),
    data: Path = typer.Option(..., help="Training data (JSONL)."),
    out: Path = typer.Option(..., help="Adapter output directory."),
    eval_data: Path | None = typer.Option(None, help="Held-out data (JSONL) for eval loss."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    dropout: float = typer.Option(0.0, help="LoRA dropout."),
    targets: str = typer.Option("q_proj,v_proj", help="Names, all-linear, or re:<regex>."),
    rslora: bool = typer.Option(False, help="Scale by alpha/sqrt(r)."),
    max_steps: int = typer.Option(300, help="Optimizer steps."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    batch_size: int = typer.Option(16, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step."),
    seq_len: int = typer.Option(128, help="Maximum tokens per example."),
    seed: int = typer.Option(0, help="Seed for LoRA init and data order."),
    workers: int = typer.Option(1, help="Data-parallel workers (> 1 runs on Ray Train)."),
    nodes: int = typer.Option(1, help="Nodes to spread the workers over."),
    checkpoint_every: int = typer.Option(0, help="Steps between checkpoints (distributed)."),
    max_failures: int = typer.Option(0, help="Worker-group restarts allowed (distributed)."),
    method: str = typer.Option(
        "supervised",
        help="supervised (SFT rows) | dpo (preference rows: input.messages, preferred_output, "
        "non_preferred_output) | reinforcement (prompt rows and --grader: GRPO).",
    ),
    grader: Path | None = typer.Option(
        None, help="reinforcement: the grader, a JSON or YAML file in OpenAI's shapes."
    ),
    group_size: int = typer.Option(4, help="reinforcement: samples per prompt."),
    max_new_tokens: int = typer.Option(32, help="reinforcement: longest sampled answer."),
    variant: str = typer.Option(
        "lora",
        help="lora | dora (a learned magnitude per output row) | adalora (SVD form; "
        "--r is its initial rank).",
    ),
    beta: float = typer.Option(0.1, help="dpo: how far the policy may move from the reference."),
    init_adapter: Path | None = typer.Option(
        None,
        help="Start from this adapter directory (a warm start; its config is used). DPO's "
        "reference is then this adapter, frozen.",
    ),
    target_r: int | None = typer.Option(
        None, help="adalora: the average rank per layer the budget ends at (default r // 2)."
    ),
    quantize: str = typer.Option(
        "none", help="Hold the frozen base quantized (QLoRA): none | int8 | nf4."
    ),
) -> None:
    """Fine-tune a LoRA adapter; writes the adapter and metrics.json.

    One worker trains in this process; more run data-parallel on Ray Train (a local Ray
    instance, or the cluster at LORAFLEET_RAY_ADDRESS) with the base once per node.
    """
    quiet_hf()
    from orchestrator.spec import SpecError, check_lora_variant, read_spec_file
    from orchestrator.training_configs import lora_config
    from workers.lora.io import read_adapter_config
    from workers.training.methods import METHOD_TYPES, Method
    from workers.training.recipe import TrainConfig
    from workers.training.single import train_single

    if method in ("lora", "dora", "adalora"):  # the old spelling of --variant
        warn(f"--method {method} is now --variant {method}; --method names the training "
             "method (supervised, dpo), as at OpenAI")  # fmt: skip
        method, variant = "supervised", method
    if method not in METHOD_TYPES:
        raise SpecError("method", f"--method must be one of {', '.join(METHOD_TYPES)}, got "
                        f"{method!r}")  # fmt: skip
    if (grader is not None) != (method == "reinforcement"):
        raise SpecError("grader", "--grader goes with --method reinforcement, and it needs one")
    grader_spec = read_spec_file(grader) if grader is not None else None
    how = Method(type=method, beta=beta, grader=grader_spec, group_size=group_size,
                 max_new_tokens=max_new_tokens)  # fmt: skip
    spec = check_lora_variant(variant, quantize, r=r, target_r=target_r)  # the job spec's rule
    spec = spec.model_copy(update={"alpha": alpha, "dropout": dropout, "rslora": rslora,
                                   "targets": _spec_targets(targets)})  # fmt: skip
    lcfg = (read_adapter_config(init_adapter) if init_adapter is not None
            else lora_config(spec, max_steps=max_steps))  # fmt: skip
    tcfg = TrainConfig(
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        seed=seed,
    )
    if workers > 1 or nodes > 1:
        if init_adapter is not None:
            raise SpecError("init_adapter", "--init-adapter trains in one process here; on a "
                            "cluster submit a job with init_adapter: namespace/name")  # fmt: skip
        if _grader_models(how):
            raise SpecError("grader", "a score_model grader that asks an adapter trains in one "
                            "process here; on a cluster submit a job")  # fmt: skip
        _train_on_ray(base, data, out, eval_data, lcfg, tcfg, workers, nodes, checkpoint_every,
                      max_failures, how)  # fmt: skip
        return
    with train_progress(max_steps) as on_report:
        output = train_single(
            base_dir=base,
            data_path=data,
            out_dir=out,
            lora=lcfg,
            train=tcfg,
            eval_path=eval_data,
            on_report=on_report,
            method=how,
            init_adapter=init_adapter,
            grader_models=_grader_models(how),
        )
    res = output.result
    last = res.curve[-1].metrics if res.curve else {}
    if how.type == "reinforcement":  # its eval "loss" is the negated greedy mean reward
        summary = (f"mean reward (greedy, eval) {-(res.eval_loss_initial or 0):.3f} → "
                   f"{-(res.eval_loss_final or 0):.3f}")  # fmt: skip
    else:
        summary = f"eval loss {res.eval_loss_initial:.3f} → {res.eval_loss_final:.3f}"
        if "eval_rewards/accuracies" in last:
            summary += f", eval reward accuracy {last['eval_rewards/accuracies']:.2f}"
    console.print(f"adapter written to [bold]{output.adapter_dir}[/] — {summary}, "
                  f"{res.tokens_per_s:,.0f} tokens/s")  # fmt: skip


def _grader_models(how: Any) -> dict[str, Path]:
    """A score_model grader's adapters, fetched (verified) from this machine's catalog."""
    if how.type != "reinforcement":
        return {}
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.training.graders import BASE_MODEL

    refs = sorted(set(how.parsed_grader().models) - {BASE_MODEL})
    if not refs:
        return {}
    registry = Registry.from_settings(load_settings())
    return {ref: registry.fetch(ref)[1] for ref in refs}


def _train_on_ray(
    base: Path,
    data: Path,
    out: Path,
    eval_data: Path | None,
    lcfg: object,
    tcfg: object,
    workers: int,
    nodes: int,
    checkpoint_every: int,
    max_failures: int,
    how: Any,
) -> None:
    import uuid

    import ray

    from storage.settings import load_settings
    from storage.staging import remove_staged
    from workers.base_model import check_base_dir
    from workers.datasets import read_jsonl
    from workers.training.distributed_spec import DistributedSpec
    from workers.training.ray_train import train_distributed

    check_base_dir(base)  # fail before starting Ray on plain input mistakes
    if how.type == "dpo":
        from workers.method_data import validate_preference_row

        read_jsonl(data, check=validate_preference_row)
    elif how.type == "reinforcement":
        from workers.method_data import validate_prompt_row

        read_jsonl(data, check=validate_prompt_row)
    else:
        read_jsonl(data)
    settings = load_settings()
    if settings.ray_address is not None:
        # Local paths mean nothing on a cluster's nodes; a job uploads its inputs first.
        raise WorkerError(
            "train --workers runs on a local Ray instance; on the cluster at "
            "LORAFLEET_RAY_ADDRESS submit a job instead (lorafleet submit spec.yaml uploads "
            "the local base and data)"
        )
    spec = DistributedSpec(
        job_name=f"train-{uuid.uuid4().hex[:8]}",
        base_dir=str(base.resolve()),
        data_path=str(data.resolve()),
        eval_path=str(eval_data.resolve()) if eval_data else None,
        out_dir=str(out.resolve()),
        storage_path=str(settings.home / "ray_results"),
        store={"uri": settings.object_store, "s3_endpoint": settings.s3_endpoint},
        lora=lcfg,  # type: ignore[arg-type]
        train=tcfg,  # type: ignore[arg-type]
        workers=workers,
        nodes=nodes,
        checkpoint_every=checkpoint_every,
        max_failures=max_failures,
        method=how.as_dict(),
    )
    address = settings.ray_address or "local"
    with console.status(f"starting Ray ({address}) and {workers} workers…"):
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    try:
        with console.status(f"training on {workers} workers ({spec.job_name})…"):
            result = train_distributed(spec)
        remove_staged(spec.open_store(), spec.staging_prefix)  # written to --out: done
    finally:
        ray.shutdown()
    m = result.metrics
    console.print(
        f"adapter written to [bold]{result.adapter_dir}[/] — {m['world_size']} workers on "
        f"{m['nodes']} node(s), eval loss {m['eval_loss_initial']:.3f} → "
        f"{m['eval_loss_final']:.3f}, {m['tokens_per_s']:,.0f} tokens/s"
    )


# -- generate / merge -----------------------------------------------------------------------
@user_errors
def generate_cmd(
    base: str = typer.Option(..., help="A base model directory, or a registered base's name."),
    prompt: list[str] = typer.Option(..., help="Prompt text (repeat for several)."),
    adapter: str | None = typer.Option(
        None, help="An adapter directory (PEFT format), or a catalog reference (ns/name[:v])."
    ),
    merged: bool = typer.Option(False, help="Merge the adapter into the base first."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
) -> None:
    """Greedy completion from the base, or base + adapter (optionally merged).

    A registered base or a catalog adapter comes through this machine's verified cache.
    """
    quiet_hf()
    from workers.base_model import load_base
    from workers.generate import greedy_generate
    from workers.lora import load_adapter, merge_lora

    if merged and adapter is None:
        raise WorkerError("--merged needs --adapter")
    base_dir, adapter_dir = _local_or_registered(base, adapter)
    model, tokenizer = load_base(base_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        if merged:
            merge_lora(model)
    for text in greedy_generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens):
        console.print(text, highlight=False, markup=False)


def _local_or_registered(base: str, adapter: str | None) -> tuple[Path, Path | None]:
    """Local directories as given; otherwise a registered base / catalog adapter, fetched."""
    base_path = Path(base).expanduser()
    adapter_path = Path(adapter).expanduser() if adapter is not None else None
    if base_path.is_dir() and (adapter_path is None or adapter_path.is_dir()):
        return base_path, adapter_path
    from storage.registry import Registry

    registry = Registry.from_settings()
    if not base_path.is_dir():
        with console.status(f"fetching base {base}…"):
            base_path = registry.base_dir(base)
    if adapter is not None and (adapter_path is None or not adapter_path.is_dir()):
        with console.status(f"fetching adapter {adapter}…"):
            adapter_path = registry.fetch(adapter)[1]
    return base_path, adapter_path


@user_errors
def merge_cmd(
    base: Path = typer.Option(..., help="Base model directory."),
    adapter: Path = typer.Option(..., help="Adapter directory (PEFT format)."),
    out: Path = typer.Option(..., help="Output directory for the merged model."),
) -> None:
    """Write base + adapter as one plain Hugging Face model (zero inference overhead)."""
    quiet_hf()
    from workers.merged_export import export_merged

    export_merged(base_dir=base, adapter_dir=adapter, out_dir=out)
    console.print(f"merged model written to [bold]{out}[/]")
