"""The adapter registry: publish, resolve, fetch, import, promote, delete and garbage-collect.

Publishing uploads an adapter directory under a fresh immutable prefix, checks what the store
holds, and only then creates the catalog row — directly ``ready``, in one transaction. So no
``ready`` row ever points at missing or unverified bytes; a failure midway leaves at most
orphan objects, which ``gc`` removes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.adapter_files import check_against_base, inspect_adapter_dir
from storage.cache import AdapterCache
from storage.catalog import repository as repo
from storage.catalog.db import Catalog, open_catalog
from storage.catalog.domain import AdapterVersion, BaseModel, FileDigest
from storage.errors import AdapterRejected, IntegrityError
from storage.fingerprint import fingerprint_model_dir, tensor_index
from storage.names import parse_ref, validate_name
from storage.objects import ObjectStore, open_store
from storage.objects.s3 import S3ObjectStore
from storage.settings import Settings, load_settings

log = logging.getLogger(__name__)
ADAPTER_ROOT = "adapters"


@dataclass
class GcReport:
    """What ``gc`` found and removed."""

    orphan_keys: list[str]
    deleted_keys: list[str]


class Registry:
    """Catalog + object store + node cache, the storage layer's one entry point."""

    def __init__(self, catalog: Catalog, store: ObjectStore, cache: AdapterCache) -> None:
        self.catalog = catalog
        self.store = store
        self.cache = cache

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Registry:
        """Open what the configuration names (embedded defaults migrate themselves)."""
        s = settings or load_settings()
        catalog = open_catalog(s.catalog_url, auto_upgrade=s.embedded_catalog)
        store = open_store(s.object_store, s3_endpoint=s.s3_endpoint)
        if isinstance(store, S3ObjectStore) and s.embedded_catalog:
            store.ensure_bucket()
        return cls(catalog, store, AdapterCache(s.cache_dir, max_bytes=s.cache_max_bytes))

    # -- bases ----------------------------------------------------------------------------------
    def register_base(self, *, name: str, path: str | Path) -> BaseModel:
        """Fingerprint a local base directory and register it under ``name``."""
        fp = fingerprint_model_dir(path)
        return repo.register_base_model(
            self.catalog,
            name=name,
            source=str(Path(path).resolve()),
            architecture=fp.architecture,
            parameter_count=fp.parameter_count,
            fingerprint=fp.sha256,
        )

    def check_adapter(self, adapter_dir: str | Path, base: BaseModel) -> None:
        """Refuse an adapter that is unsafe or does not fit ``base`` (shapes, modules)."""
        manifest = inspect_adapter_dir(adapter_dir)
        source = Path(base.source)
        if not source.is_dir():
            raise AdapterRejected(
                f"base {base.name!r} source {base.source} is not readable here; cannot check shapes"
            )
        fp = fingerprint_model_dir(source)
        if fp.sha256 != base.fingerprint:
            raise AdapterRejected(
                f"base {base.name!r} at {base.source} no longer matches its registered fingerprint"
            )
        check_against_base(manifest, tensor_index(source))

    # -- publish --------------------------------------------------------------------------------
    def publish(
        self,
        *,
        adapter_dir: str | Path,
        ref: str,
        base_model: str,
        job_id: str | None = None,
        dataset_sha256: str | None = None,
        metrics: dict[str, Any] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        tags: Iterable[str] = (),
        created_by: str | None = None,
    ) -> AdapterVersion:
        """Upload, verify, then record a new ready version of ``ref`` (``namespace/name``).

        Raises:
            InvalidReference, AdapterRejected, BaseModelNotFound, ObjectStoreUnavailable,
            CatalogUnavailable.
        """
        target = parse_ref(ref)
        if target.version is not None or target.alias is not None:
            raise AdapterRejected(f"publish to namespace/name, not to a version or alias: {ref}")
        for t in tags:
            validate_name(t, kind="tag")
        base = repo.get_base_model(self.catalog, name=base_model)
        self.check_adapter(adapter_dir, base)
        manifest = inspect_adapter_dir(adapter_dir)
        prefix = f"{ADAPTER_ROOT}/{target.namespace}/{target.name}/{uuid.uuid4().hex}"
        digests = []
        t0 = time.perf_counter()
        for path in manifest.files:
            put = self.store.put_file(path, f"{prefix}/{path.name}")
            stored = self.store.stat(put.key)
            if stored.size != put.size:
                raise IntegrityError(f"{put.key}: stored {stored.size} bytes, sent {put.size}")
            digests.append(FileDigest(path.name, put.sha256, put.size))
        log.info("uploaded %s in %.0f ms", prefix, (time.perf_counter() - t0) * 1000)
        return repo.create_adapter_version(
            self.catalog,
            namespace=target.namespace,
            name=target.name,
            base_model_id=base.id,
            object_prefix=prefix,
            files=digests,
            r=manifest.r,
            alpha=manifest.alpha,
            target_modules=manifest.target_modules,
            use_rslora=manifest.use_rslora,
            job_id=job_id,
            dataset_sha256=dataset_sha256,
            metrics=metrics,
            hyperparameters=hyperparameters or {"lora": manifest.config},
            tags=tags,
            created_by=created_by,
        )

    def import_adapter(
        self, *, adapter_dir: str | Path, ref: str, base_model: str, tags: Iterable[str] = ()
    ) -> AdapterVersion:
        """Publish an existing PEFT adapter directory (made elsewhere) after checking it."""
        return self.publish(
            adapter_dir=adapter_dir, ref=ref, base_model=base_model, tags=tags, created_by="import"
        )

    # -- read -----------------------------------------------------------------------------------
    def resolve(self, ref: str) -> AdapterVersion:
        return repo.resolve_adapter(self.catalog, ref=parse_ref(ref))

    def fetch(self, ref: str) -> tuple[AdapterVersion, Path]:
        """Resolve and bring a version into the node cache (verified); returns its directory."""
        version = self.resolve(ref)
        return version, self.cache.get(version, self.store)

    def list(self, **filters: Any) -> list[AdapterVersion]:
        return repo.list_adapter_versions(self.catalog, **filters)

    def promote(self, ref: str, alias: str) -> AdapterVersion:
        return repo.set_alias(self.catalog, ref=parse_ref(ref), alias=alias)

    def delete(self, ref: str) -> AdapterVersion:
        version = repo.delete_adapter_version(self.catalog, ref=parse_ref(ref))
        self.cache.remove(version)
        return version

    # -- garbage collection ---------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, min_age_s: float = 3600.0) -> GcReport:
        """Delete objects that no live version references.

        Orphans of failed publishes and bytes of deleted versions both go. Objects younger than
        ``min_age_s`` are kept, since they may belong to a publish still in flight.
        """
        live = repo.live_object_prefixes(self.catalog)
        now = time.time()
        orphans, deleted = [], []
        for obj in self.store.list(f"{ADAPTER_ROOT}/"):
            prefix = obj.key.rsplit("/", 1)[0]
            if prefix in live:
                continue
            if obj.modified is not None and now - obj.modified < min_age_s:
                continue
            orphans.append(obj.key)
            if not dry_run:
                self.store.delete(obj.key)
                deleted.append(obj.key)
        return GcReport(orphan_keys=orphans, deleted_keys=deleted)
