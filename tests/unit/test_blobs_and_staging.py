"""Content-addressed blobs, staged directories and the node cache's base/file entries
(local object store only: no servers)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from storage.blobs import blob_key, put_blob
from storage.cache import AdapterCache
from storage.catalog.domain import BaseModel, DataFile, FileDigest
from storage.errors import IntegrityError, InvalidName, ObjectNotFound
from storage.objects import LocalObjectStore
from storage.staging import (
    checkpoint_prefix,
    fetch_staged,
    latest_checkpoint,
    prune_checkpoints,
    stage_dir,
)


def test_blobs_are_stored_once_and_keyed_by_content(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(5000))
    first = put_blob(store, a)
    assert first.uploaded and store.exists(blob_key(first.sha256))
    copy = tmp_path / "copy.bin"
    copy.write_bytes(a.read_bytes())
    again = put_blob(store, copy)
    assert (again.sha256, again.uploaded) == (first.sha256, False)  # nothing sent again
    with pytest.raises(IntegrityError, match="changed while"):  # digest given ≠ bytes sent
        put_blob(store, copy, sha256="0" * 64)
    assert not store.exists(blob_key("0" * 64))
    for bad in ("../x", "abc", "G" * 64):
        with pytest.raises(InvalidName):
            blob_key(bad)


def test_staged_directory_round_trip_and_latest_checkpoint(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    src = tmp_path / "src"
    src.mkdir()
    (src / "lora.safetensors").write_bytes(b"w" * 100)
    (src / "trainer_state.json").write_text('{"step": 3}')
    assert latest_checkpoint(store, "ftjob-1") is None
    for step in (3, 6, 9):
        stage_dir(store, src, checkpoint_prefix("ftjob-1", step))
    # an incomplete one (no manifest: the writer died) is never chosen
    store.put_file(src / "lora.safetensors", f"{checkpoint_prefix('ftjob-1', 12)}/lora.safetensors")
    assert latest_checkpoint(store, "ftjob-1") == (9, checkpoint_prefix("ftjob-1", 9))
    out = fetch_staged(store, checkpoint_prefix("ftjob-1", 9), tmp_path / "out")
    assert (out / "trainer_state.json").read_text() == '{"step": 3}'
    assert prune_checkpoints(store, "ftjob-1", keep=2) == [checkpoint_prefix("ftjob-1", 3)]
    assert latest_checkpoint(store, "ftjob-1") == (9, checkpoint_prefix("ftjob-1", 9))
    with pytest.raises(ObjectNotFound):
        fetch_staged(store, checkpoint_prefix("ftjob-1", 3), tmp_path / "gone")
    # a tampered object is caught by the manifest's digest, and nothing is left in place
    key = f"{checkpoint_prefix('ftjob-1', 6)}/lora.safetensors"
    (store.root / key).write_bytes(b"x" * 100)
    with pytest.raises(IntegrityError):
        fetch_staged(store, checkpoint_prefix("ftjob-1", 6), tmp_path / "bad")
    assert not (tmp_path / "bad" / "lora.safetensors").exists()


def _base_record(store: LocalObjectStore, tmp_path: Path) -> BaseModel:
    files = []
    for name, size in (("config.json", 100), ("model.safetensors", 200_000)):
        p = tmp_path / name
        p.write_bytes(os.urandom(size))
        blob = put_blob(store, p)
        files.append(FileDigest(name, blob.sha256, blob.size))
    return BaseModel(1, "tiny", "/elsewhere", "Llama", 1, "f" * 64, tuple(files))


def _fetch_in_process(root: str, store_root: str, base_json: str) -> str:
    base = json.loads(base_json)
    record = BaseModel(**{**base, "files": tuple(FileDigest(**f) for f in base["files"])})
    return str(AdapterCache(root).get_base(record, LocalObjectStore(store_root)))


def test_a_base_is_downloaded_once_per_node(tmp_path):
    """Threads and processes of one node ask at once: one download of each file in all."""
    store = LocalObjectStore(tmp_path / "objects")
    base = _base_record(store, tmp_path)
    cache_root = tmp_path / "node-cache"
    cache = AdapterCache(cache_root)
    gate = threading.Barrier(4)
    results: list[Path] = []

    def fetch() -> None:
        gate.wait()  # all four ask at the same moment
        results.append(cache.get_base(base, store))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    payload = json.dumps({**base.__dict__, "files": [f.__dict__ for f in base.files]})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        pending = [pool.apply_async(_fetch_in_process, (str(cache_root), str(store.root), payload))
                   for _ in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        others = [Path(p.get(timeout=60)) for p in pending]
    assert len({*results, *others}) == 1
    entry = results[0]
    assert (entry / "model.safetensors").stat().st_size == 200_000
    log = cache.download_log()
    assert len(log) == 2 and sum(int(e["bytes"]) for e in log) == base.total_bytes
    assert cache.downloads <= 2  # this process: its threads shared one download


def test_base_cache_refuses_bad_bytes_and_unstored_bases(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    base = _base_record(store, tmp_path)
    cache = AdapterCache(tmp_path / "cache")
    (store.root / blob_key(base.files[1].sha256)).write_bytes(b"\0" * 200_000)  # corrupted
    with pytest.raises(IntegrityError):
        cache.get_base(base, store)
    assert not cache.base_dir(base).exists()  # nothing partial left behind
    with pytest.raises(IntegrityError, match="register it again"):
        cache.get_base(BaseModel(2, "old", "/x", "Llama", 1, "e" * 64), store)
    evil = BaseModel(3, "evil", "/x", "Llama", 1, "d" * 64,
                     (FileDigest("../../escape", base.files[0].sha256, 100),))  # fmt: skip
    with pytest.raises(InvalidName):
        cache.get_base(evil, store)


def test_data_file_entry_is_verified(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hi"}\n')
    blob = put_blob(store, p)
    record = DataFile("file-" + "a" * 24, "team", "d.jsonl", "fine-tune", blob.size, 1, blob.sha256)
    cache = AdapterCache(tmp_path / "cache")
    got = cache.get_file(record, store)
    assert got.read_text() == p.read_text() and cache.get_file(record, store) == got
    assert cache.downloads == 1 and cache.entries() == []  # not an adapter: never evicted
