"""The node cache on a local store: verified entries, atomic placement, LRU eviction."""

from __future__ import annotations

import os
import threading

import pytest

from storage.cache import AdapterCache
from storage.catalog.domain import AdapterVersion, BaseModel, FileDigest
from storage.errors import IntegrityError
from storage.objects import LocalObjectStore

BASE = BaseModel(1, "tiny", "/x", "Llama", 1, "f" * 64)


def _publish(store, tmp_path, name, size=1000, corrupt=False):  # type: ignore[no-untyped-def]
    src = tmp_path / f"{name}.bin"
    src.write_bytes(os.urandom(size))
    put = store.put_file(src, f"adapters/team/{name}/u/adapter_model.safetensors")
    digest = "0" * 64 if corrupt else put.sha256
    return AdapterVersion(
        id=1,
        namespace="team",
        name=name,
        version=1,
        state="ready",
        base_model=BASE,
        object_prefix=f"adapters/team/{name}/u",
        files=(FileDigest("adapter_model.safetensors", digest, put.size),),
        total_bytes=put.size,
        r=1,
        alpha=1,
        target_modules=["q_proj"],
        use_rslora=False,
        job_id=None,
        dataset_sha256=None,
    )


def test_hit_miss_and_single_download(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    cache = AdapterCache(tmp_path / "cache")
    v = _publish(store, tmp_path, "a")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cache.get(v, store))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and cache.downloads == 1
    assert (paths[0] / "adapter_model.safetensors").stat().st_size == 1000


def test_corrupt_entry_never_lands(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    cache = AdapterCache(tmp_path / "cache")
    v = _publish(store, tmp_path, "bad", corrupt=True)
    with pytest.raises(IntegrityError):
        cache.get(v, store)
    assert cache.entries() == []
    assert not cache.entry_dir(v).exists()


def test_lru_eviction_keeps_the_newest(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    cache = AdapterCache(tmp_path / "cache", max_bytes=2500)
    a, b, c = (_publish(store, tmp_path, n) for n in ("a", "b", "c"))
    cache.get(a, store)
    cache.get(b, store)
    os.utime(cache.entry_dir(a) / ".complete", (1, 1))  # a is least recently used
    cache.get(c, store)
    assert not cache.entry_dir(a).exists()
    assert cache.entry_dir(b).exists() and cache.entry_dir(c).exists()
