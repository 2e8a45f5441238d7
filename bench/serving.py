"""Serving throughput with many adapters in one batch (the batched multi-adapter layer).

Same base, same prompts, same decode length, in one process:
- ours: one batch of 64 prompts whose rows use 1, 4, 16 or 64 distinct adapters (slots),
  decoded greedily in one batched pass per step (``generate_mixed``);
- PEFT: the same 64 prompts with 16 adapters through PEFT's mixed-batch inference
  (``generate(..., adapter_names=[...])``).
Ratios: ours(16) / ours(1) (target ≥ 0.8) and ours(16) / PEFT(16) (target ≥ 2).

Also, side by side in the same run:
- merged vs base latency: one request decoding 32 tokens on the base with one adapter merged
  in (what ``--merged`` serves) vs the bare base (target ≤ 1.03);
- cold load: an ~8 MB adapter from an S3 server (moto, its own process) to ready in a device
  slot — catalog lookup, verified download, parse, fingerprint and shape checks, slot copy —
  vs a raw boto3 GET + SHA-256 of the same objects.

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
RANK_COLD = 85  # all-linear on the bench base: an 8 MB adapter


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
    merged = bench_merged(base_dir, work / "ad0")
    cold = bench_cold_load(base_dir, work)
    times: dict[str, list[float]] = {k: [] for k in ("1", "4", "16", "64", "peft16")}
    for _ in range(7):  # alternating rounds; ratios are medians of per-round ratios (drift)
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
            "ours16_vs_ours1": median(
                [a / b for a, b in zip(times["1"], times["16"], strict=True)]
            ),
            "ours16_vs_peft16": median(
                [a / b for a, b in zip(times["peft16"], times["16"], strict=True)]
            ),
        },
        "note": "every row decodes exactly new_tokens (min_new_tokens = max_new_tokens)",
        "merged_vs_base": merged,
        "cold_load": cold,
    }
    results["ratios"]["merged_vs_base_latency"] = merged["ratio"]
    results["ratios"]["cold_load_vs_raw_get_sha"] = cold["ratio"]
    print("tokens/s: " + ", ".join(f"{k} adapters {v:,.0f}" for k, v in tps.items()))
    print(
        f"16 vs 1 adapter: {results['ratios']['ours16_vs_ours1']:.3f}×; ours vs PEFT at 16: "
        f"{results['ratios']['ours16_vs_peft16']:.2f}×"
    )
    print(
        f"merged vs base latency: {merged['ratio']:.3f}× ({merged['merged_ms']:.1f} vs "
        f"{merged['base_ms']:.1f} ms for {merged['new_tokens']} tokens)"
    )
    print(
        f"cold load of a {cold['adapter_mb']:.1f} MB adapter from S3 to a slot: "
        f"{cold['ready_ms']:.1f} ms vs raw GET+SHA-256 {cold['raw_ms']:.1f} ms = "
        f"{cold['ratio']:.2f}×"
    )
    print(f"wrote {write_result('serving', results)}")


def bench_merged(base_dir: Path, adapter_dir: Path, rounds: int = 15) -> dict[str, Any]:
    """Latency of one request on a merged adapter vs the bare base (same decode loop)."""
    from workers.base_model import load_base
    from workers.lora import load_adapter, merge_lora, remove_lora
    from workers.serving.decode import DecodeRow
    from workers.serving.stepper import decode_batch

    plain, tok = load_base(base_dir)
    merged, _ = load_base(base_dir)
    load_adapter(merged, adapter_dir)
    merge_lora(merged)
    remove_lora(merged)
    row = DecodeRow(tok("spell 3 1 4 =")["input_ids"], max_new_tokens=32, min_new_tokens=32)

    def once(model: Any) -> float:
        t0 = time.perf_counter()
        decode_batch(model, tok, {}, [row])
        return time.perf_counter() - t0

    once(plain), once(merged)  # warm-up
    base_t, merged_t = [], []
    for _ in range(rounds):  # alternating
        base_t.append(once(plain))
        merged_t.append(once(merged))
    b, m = median(base_t), median(merged_t)
    return {"base_ms": b * 1000, "merged_ms": m * 1000, "ratio": m / b, "new_tokens": 32}


def bench_cold_load(base_dir: Path, work: Path, rounds: int = 5) -> dict[str, Any]:
    """An ~8 MB adapter: object store → ready in a slot, vs raw boto3 GET + SHA-256."""
    import hashlib
    import uuid

    from infra.servers import MotoS3Process
    from storage.cache import AdapterCache
    from storage.catalog.db import open_catalog
    from storage.objects import S3ObjectStore
    from storage.registry import Registry
    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter
    from workers.serving.engine import ServingEngine

    moto = MotoS3Process()
    try:
        store = S3ObjectStore(f"bench-{uuid.uuid4().hex[:8]}", "lf", endpoint_url=moto.endpoint)
        store.ensure_bucket()
        catalog = open_catalog(f"sqlite:///{work / 'cold.db'}", auto_upgrade=True)
        registry = Registry(catalog, store, AdapterCache(work / "cold-cache"))
        registry.register_base(name="bench", path=base_dir)
        model, _ = load_base(base_dir)
        cfg = LoraConfig(r=RANK_COLD, alpha=64, target_modules="all-linear")
        inject_lora(model, cfg)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.weight.normal_(0, 0.01)
        adapter = save_adapter(model, cfg, work / "big")
        version = registry.publish(adapter_dir=adapter, ref="bench/big", base_model="bench")
        size = sum(f.size for f in version.files)
        engine = ServingEngine(base_dir, registry, slots=2, max_rank=RANK_COLD)
        keys = [f"{store.prefix}/{version.object_prefix}/{f.name}" for f in version.files]

        def ready() -> float:
            engine.unload(version.ref, disk=True)  # nothing cached on any tier
            t0 = time.perf_counter()
            engine.warm("bench/big")
            return time.perf_counter() - t0

        def raw() -> float:
            t0 = time.perf_counter()
            for key in keys:
                body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
                h = hashlib.sha256()
                while chunk := body.read(1 << 20):
                    h.update(chunk)
            return time.perf_counter() - t0

        ready(), raw()  # warm-up (connections, imports)
        ready_t, raw_t = [], []
        for _ in range(rounds):
            ready_t.append(ready())
            raw_t.append(raw())
        catalog.dispose()
    finally:
        moto.stop()
    r, w = median(ready_t), median(raw_t)
    return {"adapter_mb": size / 1e6, "ready_ms": r * 1000, "raw_ms": w * 1000, "ratio": r / w}


if __name__ == "__main__":
    main()
