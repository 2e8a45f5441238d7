"""A real S3-compatible server that is not AWS: SeaweedFS (``weed server -s3``).

SeaweedFS returns no ChecksumSHA256 — which is why lorafleet keeps its own digests.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from infra.servers import seaweedfs_s3
from storage.cache import AdapterCache
from storage.catalog.db import open_catalog
from storage.errors import IntegrityError
from storage.objects import S3ObjectStore
from storage.registry import Registry
from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter


@pytest.fixture(scope="module")
def weed_endpoint():  # type: ignore[no-untyped-def]
    with seaweedfs_s3() as endpoint:
        yield endpoint


def test_publish_fetch_and_integrity_on_seaweedfs(weed_endpoint, tiny_base_dir, tmp_path):
    store = S3ObjectStore(f"lorafleet-{uuid.uuid4().hex[:8]}", "org", endpoint_url=weed_endpoint)
    store.ensure_bucket()
    catalog = open_catalog(f"sqlite:///{tmp_path / 'c.db'}", auto_upgrade=True)
    reg = Registry(catalog, store, AdapterCache(tmp_path / "cache"))
    reg.register_base(name="tiny", path=tiny_base_dir)

    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4)
    inject_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_()
    adapter = save_adapter(model, cfg, tmp_path / "ad")

    v = reg.publish(adapter_dir=adapter, ref="team/weed", base_model="tiny")
    key = f"{v.object_prefix}/adapter_model.safetensors"
    head = store.client.head_object(Bucket=store.bucket, Key=store._key(key))
    assert "ChecksumSHA256" not in head  # the server does not vouch for content: we do
    _, path = reg.fetch("team/weed")
    assert (path / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()

    reg.cache.remove(v)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    store.client.put_object(Bucket=store.bucket, Key=store._key(key), Body=data[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError):
        reg.fetch("team/weed")
    assert reg.cache.entries() == []
    catalog.dispose()
