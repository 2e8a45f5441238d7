"""Publish → resolve → fetch, with the faults the catalog and the cache must survive."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from storage.catalog import repository as repo
from storage.errors import (
    AdapterExists,
    AdapterNotFound,
    AdapterRejected,
    IntegrityError,
    InvalidName,
    ObjectStoreUnavailable,
)
from storage.objects import LocalObjectStore, S3ObjectStore
from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, save_adapter


@pytest.fixture()
def adapter_dir(tiny_base_dir, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4, target_modules=("q_proj", "v_proj"))
    inject_lora(model, cfg)
    out = save_adapter(model, cfg, tmp_path / "adapter")
    (out / "metrics.json").write_text(json.dumps({"eval_loss_final": 0.1}))
    return out


def _corrupt(registry, version, how):  # type: ignore[no-untyped-def]
    key = f"{version.object_prefix}/adapter_model.safetensors"
    store = registry.store
    original = store.open(key).read()
    data = {
        "flip": original[:-1] + bytes([original[-1] ^ 1]),
        "truncate": original[:100],
        "replace": b"x" * len(original),
    }[how]
    if isinstance(store, LocalObjectStore):
        path = store.root / key
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        assert isinstance(store, S3ObjectStore)
        store.client.put_object(Bucket=store.bucket, Key=store._key(key), Body=data)


def test_publish_fetch_round_trip(registry, adapter_dir):
    v = registry.publish(
        adapter_dir=adapter_dir,
        ref="team/digits",
        base_model="tiny",
        tags=["demo"],
        metrics={"exact_match": 1.0},
    )
    assert (v.state, v.version, v.namespace, v.name) == ("ready", 1, "team", "digits")
    names = {f.name for f in v.files}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "metrics.json"}
    assert all(len(f.sha256) == 64 for f in v.files)
    assert v.base_model.name == "tiny" and v.r == 4 and v.tags == ("demo",)
    version, path = registry.fetch("team/digits")
    assert version.version == 1
    for f in v.files:
        assert (path / f.name).read_bytes() == (adapter_dir / f.name).read_bytes()
    downloads = registry.cache.downloads
    registry.fetch("team/digits:1")
    assert registry.cache.downloads == downloads  # cache hit: nothing fetched again


def test_concurrent_fetches_download_once(registry, adapter_dir):
    registry.publish(adapter_dir=adapter_dir, ref="team/digits", base_model="tiny")
    paths, errors = [], []

    def fetch() -> None:
        try:
            paths.append(registry.fetch("team/digits")[1])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(paths)) == 1
    assert registry.cache.downloads == 3  # one download of each of the 3 files


@pytest.mark.parametrize("how", ["flip", "truncate", "replace"])
def test_corrupt_object_fails_fetch_and_caches_nothing(registry, adapter_dir, how):
    v = registry.publish(adapter_dir=adapter_dir, ref="team/digits", base_model="tiny")
    _corrupt(registry, v, how)
    with pytest.raises(IntegrityError):
        registry.fetch("team/digits")
    assert registry.cache.entries() == []
    entry = registry.cache.entry_dir(v)
    assert not entry.exists()
    assert [p for p in entry.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_store_down_mid_publish_then_retry(request, tmp_path, tiny_base_dir, adapter_dir):
    """The S3 server stops after the first file: no ready row, a clear error; retry works."""
    from storage.cache import AdapterCache
    from storage.catalog.db import open_catalog
    from storage.registry import Registry
    from tests.integration.conftest import make_s3_store

    moto = request.getfixturevalue("moto_s3")
    store = make_s3_store(moto)
    store.client.meta.config.retries = {"max_attempts": 2, "mode": "standard"}
    catalog = open_catalog(f"sqlite:///{tmp_path / 'c.db'}", auto_upgrade=True)
    reg = Registry(catalog, store, AdapterCache(tmp_path / "cache"))
    reg.register_base(name="tiny", path=tiny_base_dir)
    original_put = store.put_file
    calls = {"n": 0}

    def put_then_crash(path, key):  # type: ignore[no-untyped-def]
        result = original_put(path, key)
        calls["n"] += 1
        if calls["n"] == 1:
            moto.stop()
        return result

    store.put_file = put_then_crash  # type: ignore[method-assign]
    try:
        with pytest.raises(ObjectStoreUnavailable, match="failed to"):
            reg.publish(adapter_dir=adapter_dir, ref="team/digits", base_model="tiny")
    finally:
        moto.start()
    store.put_file = original_put  # type: ignore[method-assign]
    assert repo.list_adapter_versions(catalog, include_deleted=True) == []
    with pytest.raises(AdapterNotFound):
        reg.resolve("team/digits")
    v = reg.publish(adapter_dir=adapter_dir, ref="team/digits", base_model="tiny")
    assert v.version == 1 and v.state == "ready"
    report = reg.gc(min_age_s=0)
    assert len(report.deleted_keys) == 1  # the failed attempt's orphan
    assert reg.fetch("team/digits")[0].version == 1
    catalog.dispose()


def test_gc_removes_orphans_and_deleted_versions_only(registry, adapter_dir, tmp_path):
    keep = registry.publish(adapter_dir=adapter_dir, ref="team/keep", base_model="tiny")
    gone = registry.publish(adapter_dir=adapter_dir, ref="team/gone", base_model="tiny")
    stray = tmp_path / "stray"
    stray.write_bytes(b"orphan")
    registry.store.put_file(stray, "adapters/team/x/deadbeef/adapter_model.safetensors")
    from storage.blobs import blob_key, put_blob

    orphan_blob = blob_key(put_blob(registry.store, stray).sha256)  # no base or file names it
    registry.delete("team/gone")
    assert registry.gc(min_age_s=3600).deleted_keys == []  # too young: may be in flight
    dry = registry.gc(min_age_s=0, dry_run=True)
    assert len(dry.orphan_keys) == 5 and dry.deleted_keys == []
    report = registry.gc(min_age_s=0)
    assert len(report.deleted_keys) == 5 and orphan_blob in report.deleted_keys
    assert all(k.startswith((gone.object_prefix, "adapters/team/x/", orphan_blob))
               for k in report.deleted_keys)  # fmt: skip
    assert registry.fetch("team/keep")[0].version == keep.version
    base = registry.base("tiny")  # the base's blobs are live: all still there
    assert all(registry.store.exists(blob_key(f.sha256)) for f in base.files)


def test_gc_during_a_publish_keeps_its_objects(registry, adapter_dir, monkeypatch):
    """gc with no age margin runs between a publish's uploads: the lease keeps the objects
    already uploaded, and the version that becomes ready is complete and fetchable."""
    put, ran = registry.store.put_file, []

    def put_then_gc(path, key):  # type: ignore[no-untyped-def]
        info = put(path, key)
        if not ran:  # after the first object of the publish is stored
            ran.append(registry.gc(min_age_s=0))
        return info

    monkeypatch.setattr(registry.store, "put_file", put_then_gc)
    version = registry.publish(adapter_dir=adapter_dir, ref="team/racing", base_model="tiny")
    assert ran and ran[0].deleted_keys == []  # gc saw the object and kept it
    assert repo.leased_prefixes(registry.catalog) == set()  # the lease is gone with the publish
    monkeypatch.undo()
    _, fetched = registry.fetch(version.ref)  # every object there, verified
    assert (fetched / "adapter_config.json").is_file()
    assert registry.gc(min_age_s=0).deleted_keys == []  # ready now: live, kept for good


def test_a_publish_whose_object_vanishes_never_becomes_ready(registry, adapter_dir, monkeypatch):
    put = registry.store.put_file

    def put_then_lose(path, key):  # type: ignore[no-untyped-def]
        info = put(path, key)
        if key.endswith("adapter_config.json"):
            registry.store.delete(key)  # whatever removed it, the re-check sees it
        return info

    monkeypatch.setattr(registry.store, "put_file", put_then_lose)
    with pytest.raises(IntegrityError, match="vanished"):
        registry.publish(adapter_dir=adapter_dir, ref="team/broken", base_model="tiny")
    assert all(v.name != "broken" for v in registry.list(namespace="team"))
    assert repo.leased_prefixes(registry.catalog) == set()


def test_import_peft_adapter(registry, tiny_base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, _ = load_base(tiny_base_dir)
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    v = registry.import_adapter(
        adapter_dir=tmp_path / "peft", ref="team/from-peft", base_model="tiny"
    )
    assert v.created_by == "import" and v.target_modules == ["k_proj", "q_proj"]


def _variant(adapter_dir, tmp_path, name):  # type: ignore[no-untyped-def]
    out = tmp_path / name
    shutil.copytree(adapter_dir, out)
    return out


def test_import_rejects_bad_input(registry, adapter_dir, tmp_path):
    for ref in ("team/../etc", "../x", "/abs/path", "Team/x", "team/x y", "team", "team/x/y"):
        with pytest.raises(InvalidName):
            registry.import_adapter(adapter_dir=adapter_dir, ref=ref, base_model="tiny")

    linked = _variant(adapter_dir, tmp_path, "linked")
    (linked / "metrics.json").unlink()
    (linked / "metrics.json").symlink_to("/etc/passwd")
    with pytest.raises(AdapterRejected, match="symlink"):
        registry.import_adapter(adapter_dir=linked, ref="team/x", base_model="tiny")

    pickled = _variant(adapter_dir, tmp_path, "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match="pickle"):
        registry.import_adapter(adapter_dir=pickled, ref="team/x", base_model="tiny")

    wrong = _variant(adapter_dir, tmp_path, "wrong-shape")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file(
        {key: torch.zeros(4, 64), key.replace("lora_A", "lora_B"): torch.zeros(128, 4)},
        wrong / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterRejected, match="another base shape"):
        registry.import_adapter(adapter_dir=wrong, ref="team/x", base_model="tiny")

    missing = _variant(adapter_dir, tmp_path, "missing-module")
    save_file(
        {
            "base_model.model.model.layers.9.mlp.foo.lora_A.weight": torch.zeros(4, 128),
            "base_model.model.model.layers.9.mlp.foo.lora_B.weight": torch.zeros(128, 4),
        },
        missing / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterRejected, match="does not have"):
        registry.import_adapter(adapter_dir=missing, ref="team/x", base_model="tiny")
    assert registry.list() == []


def test_bases_live_in_the_object_store(registry, tiny_base_dir, tmp_path, adapter_dir):
    """Registered from one machine, a base reaches any node through its own verified cache."""
    from storage.cache import AdapterCache
    from storage.fingerprint import fingerprint_model_dir
    from storage.registry import Registry

    base = registry.base("tiny")  # the fixture registered it
    names = {f.name for f in base.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert base.tensor_shapes["model.embed_tokens.weight"] == (512, 128)
    for f in base.files:
        assert registry.store.stat(f"blobs/sha256/{f.sha256}").size == f.size
    puts: list[str] = []
    original = registry.store.put_file

    def counting_put(path, key, **kw):  # type: ignore[no-untyped-def]
        puts.append(key)
        return original(path, key, **kw)

    registry.store.put_file = counting_put  # type: ignore[method-assign]
    copy = tmp_path / "same-bytes"
    shutil.copytree(tiny_base_dir, copy)
    again = registry.register_base(name="tiny-copy", path=copy)
    assert puts == [] and again.fingerprint == base.fingerprint  # the same bytes: none sent
    assert registry.register_base(name="tiny", path=tiny_base_dir) == base
    # another chat template is another base: refused under the old name, before any upload
    tok_cfg = copy / "tokenizer_config.json"
    tok_cfg.write_text(tok_cfg.read_text().replace("{", '{"chat_template": "{{ x }}", ', 1))
    with pytest.raises(AdapterExists, match="other files"):
        registry.register_base(name="tiny-copy", path=copy)
    assert puts == []

    # another node: its own empty cache, and the registering machine's directory is gone
    shutil.rmtree(copy)
    node = Registry(registry.catalog, registry.store, AdapterCache(tmp_path / "node-cache"))
    fetched = node.base_dir("tiny")
    assert fetched.parent.parent == tmp_path / "node-cache"
    assert fingerprint_model_dir(fetched).sha256 == base.fingerprint
    assert node.cache.downloads == len(base.files)
    assert node.base_dir("tiny") == fetched and node.cache.downloads == len(base.files)
    # adapters are checked against the catalog's shapes: no base bytes needed for that
    v = node.publish(adapter_dir=adapter_dir, ref="team/checked", base_model="tiny-copy")
    assert v.base_model.name == "tiny-copy"


def test_base_register_refuses_pickle_only_dirs(registry, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    before = registry.store.list("blobs/")
    with pytest.raises(AdapterRejected, match=r"pytorch_model\.bin"):
        registry.register_base(name="pickled", path=d)
    assert registry.store.list("blobs/") == before  # nothing uploaded
