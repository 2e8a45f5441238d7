"""Bases through the object store: cold fetch to a node, and bytes per node with K workers.

1. Cold base fetch — object store → this node's verified cache (SHA-256 of every byte, atomic
   placement) → the ``/dev/shm`` file the node's workers map — against a raw boto3 download
   of the same objects (no hashing, no shared memory), on moto S3 in its own process over
   loopback. Paired rounds (A B, then B A, …); each round's ratio is ours / raw (≤ 1.2 is the
   target); the median and min–max are reported. The fetch alone (no shm) is reported too.
2. K = 1, 2 and 4 worker processes of one node ask the empty cache for the base at the same
   moment: the node's download log must show exactly one base's bytes.

    python bench/base_fetch.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result
from infra.servers import MotoS3Process
from storage.cache import AdapterCache
from storage.catalog.db import open_catalog
from storage.catalog.domain import BaseModel
from storage.objects import S3ObjectStore
from storage.registry import Registry


def _ours(base: BaseModel, store: S3ObjectStore, root: Path, shm: Path | None) -> float:
    import torch

    from workers.training.shared_base import write_shared_base

    t0 = time.perf_counter()
    directory = AdapterCache(root).get_base(base, store)
    if shm is not None:
        write_shared_base(directory, shm, dtype=torch.float32)
    return time.perf_counter() - t0


def _raw(base: BaseModel, store: S3ObjectStore, dest: Path) -> float:
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in base.files:
        store.client.download_file(store.bucket, store._key(f"blobs/sha256/{f.sha256}"),
                                   str(dest / f.name))  # fmt: skip
    return time.perf_counter() - t0


def _worker(root: str, endpoint: str, bucket: str, base: BaseModel, gate: Any) -> str:
    store = S3ObjectStore(bucket, "org", endpoint_url=endpoint)
    gate.wait()  # every worker of the node asks at once
    return str(AdapterCache(root).get_base(base, store))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    from workers.tiny_base import TinySpec, create_tiny_base

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-base-"))
    moto = MotoS3Process()
    results: dict[str, Any] = {"environment": environment(threads=1)}
    try:
        base_dir = create_tiny_base(work / "base", TinySpec(layers=4, hidden=512, heads=8))
        store = S3ObjectStore(f"bench-{uuid.uuid4().hex[:8]}", "org", endpoint_url=moto.endpoint)
        store.ensure_bucket()
        catalog = open_catalog(f"sqlite:///{work / 'catalog.db'}", auto_upgrade=True)
        registry = Registry(catalog, store, AdapterCache(work / "client-cache"))
        base = registry.register_base(name="big", path=base_dir)
        size = base.total_bytes
        rounds: list[dict[str, float]] = []
        for i in range(args.rounds):

            def ours_full(i: int = i) -> float:
                shm = Path("/dev/shm") / f"lorafleet-bench-{uuid.uuid4().hex[:8]}"
                try:
                    return _ours(base, store, work / f"node-{i}", shm)
                finally:
                    shm.unlink(missing_ok=True)

            # alternate which goes first, so neither always meets a warmer server or page cache
            if i % 2 == 0:
                raw = _raw(base, store, work / f"raw-{i}")
                full = ours_full()
            else:
                full = ours_full()
                raw = _raw(base, store, work / f"raw-{i}")
            fetch = _ours(base, store, work / f"node-{i}-fetch", None)
            rounds.append({"raw_s": raw, "ours_s": full, "fetch_only_s": fetch,
                           "ratio": full / raw, "fetch_only_ratio": fetch / raw})  # fmt: skip
            print(f"round {i + 1}: raw {raw * 1000:.0f} ms, ours {full * 1000:.0f} ms "
                  f"(fetch only {fetch * 1000:.0f} ms) → {full / raw:.2f}×")  # fmt: skip
        ratios = [r["ratio"] for r in rounds]
        fetch_ratios = [r["fetch_only_ratio"] for r in rounds]
        results["cold_fetch"] = {
            "base_bytes": size, "files": len(base.files), "rounds": rounds,
            "ratio_median": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "fetch_only_ratio_median": median(fetch_ratios),
            "fetch_only_ratio_min": min(fetch_ratios), "fetch_only_ratio_max": max(fetch_ratios),
        }  # fmt: skip
        print(f"cold base fetch ({size / 1e6:.1f} MB) to cache + /dev/shm vs raw boto3: "
              f"{median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}); fetch alone "
              f"{median(fetch_ratios):.2f}×")  # fmt: skip

        per_node: dict[str, Any] = {}
        ctx = multiprocessing.get_context("spawn")
        for k in (1, 2, 4):
            root = work / f"k{k}"
            gate = ctx.Manager().Barrier(k)
            with ctx.Pool(k) as pool:
                dirs = pool.starmap(_worker, [(str(root), moto.endpoint, store.bucket, base, gate)
                                              for _ in range(k)])  # fmt: skip
            log = AdapterCache(root).download_log()
            got = sum(int(e["bytes"]) for e in log)
            per_node[str(k)] = {"workers": k, "bytes_downloaded": got, "bases": got / size,
                                "distinct_dirs": len(set(dirs))}  # fmt: skip
            print(f"{k} worker(s) on one node: {got:,} bytes downloaded = {got / size:.2f} base")
        results["bytes_per_node"] = per_node
        catalog.dispose()
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {write_result('base_fetch', results)}")


if __name__ == "__main__":
    main()
