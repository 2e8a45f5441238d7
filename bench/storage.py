"""Storage benchmarks: publish + fetch vs raw boto3, and alias resolution at 10,000 versions.

1. A ~64 MB adapter (LoRA r=200 on every linear layer of a hidden-1024 Llama) is published
   and fetched through the registry (hash while uploading, size check, catalog row; verified
   download into the node cache) and, alternately, uploaded and downloaded with raw boto3
   (``upload_file``/``download_file``, no hashing) against the same moto S3 server on
   loopback (its own process). Ratio = raw time / ours (≥ 0.9 is the target).
2. 10,000 adapter versions (1,000 names × 10) with a ``production`` alias on each name, on
   SQLite and on PostgreSQL; median latency of resolving ``ns/name@production``
   (target < 5 ms).

    python bench/storage.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result
from infra.servers import MotoS3Process, fresh_database, postgres_server
from storage.cache import AdapterCache
from storage.catalog import repository as repo
from storage.catalog.db import open_catalog
from storage.catalog.models import (
    AdapterRepoRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    NamespaceRow,
)
from storage.names import parse_ref
from storage.objects import S3ObjectStore
from storage.registry import Registry


def make_big_adapter(work: Path) -> tuple[Path, Path]:
    """A hidden-1024 base and a ~64 MB all-linear adapter for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.lora import LoraConfig, inject_lora, save_adapter

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    base = work / "base"
    model.save_pretrained(base)
    lcfg = LoraConfig(r=200, target_modules="all-linear")
    inject_lora(model, lcfg)
    return base, save_adapter(model, lcfg, work / "adapter")


def bench_transfer(moto: MotoS3Process, work: Path, rounds: int) -> dict[str, Any]:
    base, adapter = make_big_adapter(work)
    size = sum(p.stat().st_size for p in adapter.iterdir())
    store = S3ObjectStore(f"bench-{uuid.uuid4().hex[:8]}", "org", endpoint_url=moto.endpoint)
    store.ensure_bucket()
    catalog = open_catalog(f"sqlite:///{work / 'catalog.db'}", auto_upgrade=True)
    registry = Registry(catalog, store, AdapterCache(work / "cache"))
    registry.register_base(name="big", path=base)
    raw = store.client
    ours_s, raw_s = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        v = registry.publish(adapter_dir=adapter, ref=f"bench/big{i}", base_model="big")
        registry.fetch(v.ref)
        ours_s.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        for f in sorted(adapter.iterdir()):
            key = f"raw/{i}/{f.name}"
            raw.upload_file(str(f), store.bucket, key)
            raw.download_file(store.bucket, key, str(work / f"raw-{i}-{f.name}"))
        raw_s.append(time.perf_counter() - t0)
    catalog.dispose()
    ours, rawm = median(ours_s), median(raw_s)
    return {
        "adapter_bytes": size,
        "publish_fetch_s_median": ours,
        "raw_boto3_s_median": rawm,
        "ours_MBps": size / ours / 1e6,
        "raw_MBps": size / rawm / 1e6,
        "ratio_vs_raw": rawm / ours,
    }


def seed_catalog(url: str, n_names: int = 1000, per_name: int = 10) -> Any:
    catalog = open_catalog(url, auto_upgrade=True)
    with catalog.session() as s:
        ns = NamespaceRow(name="bench")
        base = BaseModelRow(
            name="b", source="/x", architecture="Llama", parameter_count=1, fingerprint="f" * 64
        )
        s.add_all([ns, base])
        s.flush()
        for n in range(n_names):
            r = AdapterRepoRow(namespace_id=ns.id, name=f"adapter-{n}", last_version=per_name)
            s.add(r)
            s.flush()
            rows = [
                AdapterVersionRow(
                    repo_id=r.id,
                    version=v,
                    base_model_id=base.id,
                    r=8,
                    alpha=16,
                    target_modules=["q_proj"],
                    use_rslora=False,
                    object_prefix=f"p/{n}/{v}",
                    files={},
                    total_bytes=0,
                    metrics={},
                    hyperparameters={},
                    state="ready",
                )
                for v in range(1, per_name + 1)
            ]
            s.add_all(rows)
            s.flush()
            s.add(AliasRow(repo_id=r.id, alias="production", version_id=rows[-3].id))
    return catalog


def bench_resolve(url: str, samples: int = 500) -> dict[str, Any]:
    catalog = seed_catalog(url)
    rng = random.Random(0)
    refs = [parse_ref(f"bench/adapter-{rng.randrange(1000)}@production") for _ in range(samples)]
    for ref in refs[:20]:  # warm the pool and caches
        repo.resolve_version_number(catalog, ref=ref)
    alias_ms, full_ms = [], []
    for ref in refs:
        t0 = time.perf_counter()
        assert repo.resolve_version_number(catalog, ref=ref) == 8
        alias_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        repo.resolve_adapter(catalog, ref=ref)
        full_ms.append((time.perf_counter() - t0) * 1000)
    catalog.dispose()
    return {
        "versions": 10_000,
        "alias_resolve_ms_median": median(alias_ms),
        "alias_resolve_full_record_ms_median": median(full_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    results: dict[str, Any] = {"environment": environment(threads=1)}
    moto = MotoS3Process()
    try:
        results["transfer_moto_s3"] = t = bench_transfer(moto, work, args.rounds)
        print(
            f"publish+fetch {t['adapter_bytes'] / 1e6:.1f} MB: ours {t['ours_MBps']:.1f} MB/s, "
            f"raw boto3 {t['raw_MBps']:.1f} MB/s → ratio {t['ratio_vs_raw']:.3f}×"
        )
    finally:
        moto.stop()
    results["resolve"] = {}
    results["resolve"]["sqlite"] = r = bench_resolve(f"sqlite:///{work / 'resolve.db'}")
    print(
        f"alias resolution, 10,000 versions, SQLite: {r['alias_resolve_ms_median']:.2f} ms "
        f"median ({r['alias_resolve_full_record_ms_median']:.2f} ms with the full record)"
    )
    with postgres_server() as server:
        if server is None:
            print("PostgreSQL: no server reachable, skipped")
        else:
            with fresh_database(server) as url:
                results["resolve"]["postgresql"] = r = bench_resolve(url)
            print(
                f"alias resolution, 10,000 versions, PostgreSQL: "
                f"{r['alias_resolve_ms_median']:.2f} ms median "
                f"({r['alias_resolve_full_record_ms_median']:.2f} ms with the full record)"
            )
    print(f"wrote {write_result('storage', results)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
