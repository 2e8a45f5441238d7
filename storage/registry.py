"""The adapter registry: publish, resolve, fetch, import, promote, delete and garbage-collect.

Publishing uploads an adapter directory under a fresh immutable prefix, checks what the store
holds, and only then creates the catalog row — directly ``ready``, in one transaction. So no
``ready`` row ever points at missing or unverified bytes; a failure midway leaves at most
orphan objects, which ``gc`` removes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.adapter_files import check_against_base, inspect_adapter_dir
from storage.blobs import BLOB_ROOT, blob_key, put_blob
from storage.cache import AdapterCache
from storage.catalog import files as file_repo
from storage.catalog import repository as repo
from storage.catalog.db import Catalog, open_catalog
from storage.catalog.domain import AdapterVersion, BaseModel, DataFile, FileDigest
from storage.errors import (
    AdapterExists,
    AdapterRejected,
    IntegrityError,
    InvalidName,
    NotFound,
    ObjectNotFound,
)
from storage.fingerprint import TensorInfo, fingerprint_model_dir
from storage.names import parse_ref, validate_name
from storage.objects import ObjectStore, open_store
from storage.objects.base import file_sha256, validate_key
from storage.settings import Settings, load_settings

log = logging.getLogger(__name__)
ADAPTER_ROOT = "adapters"
# What a base directory may hold: weights as safetensors, configs, tokenizer files, templates.
# Pickle weights and Python files (remote code) are never uploaded or loaded.
BASE_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
REFUSED_BASE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".py")
# A progress callback: (bytes done, bytes in all) as transfers advance.
Progress = Callable[[int, int], None]


def base_files(path: str | Path) -> list[Path]:
    """The files of a base directory that ``register_base`` uploads (sorted by name).

    Raises:
        AdapterRejected: the directory is missing or holds pickle weights / Python code only.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterRejected(f"base model directory {root} does not exist")
    chosen = sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in BASE_FILE_SUFFIXES
    )  # fmt: skip
    for p in chosen:
        try:
            validate_key(p.name)
        except InvalidName:
            raise AdapterRejected(f"{p} has a name that cannot be stored; rename it") from None
    if not any(p.suffix == ".safetensors" for p in chosen):
        refused = [p.name for p in root.iterdir() if p.suffix in REFUSED_BASE_SUFFIXES]
        why = f" (found {', '.join(sorted(refused))}: never loaded)" if refused else ""
        raise AdapterRejected(f"{root} has no *.safetensors weights{why}")
    return chosen


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
        ensure = getattr(store, "ensure_bucket", None)  # S3 only (boto3 loads with it)
        if ensure is not None and s.embedded_catalog:
            ensure()
        return cls(catalog, store, AdapterCache(s.cache_dir, max_bytes=s.cache_max_bytes))

    # -- bases ----------------------------------------------------------------------------------
    def register_base(
        self, *, name: str, path: str | Path, progress: Progress | None = None
    ) -> BaseModel:
        """Upload a local base directory to the object store and register it under ``name``.

        Files are content-addressed blobs (uploaded in parallel; bytes the store already holds
        are not sent again) and the catalog records their SHA-256 manifest and tensor shapes.
        Registering the same bytes again uploads nothing.

        Raises:
            AdapterRejected: not a safetensors model directory.
            AdapterExists: ``name`` is registered with another fingerprint.
        """
        validate_name(name, kind="base model name")
        chosen = base_files(path)
        fp = fingerprint_model_dir(path)
        # every byte decides (a changed tokenizer or chat template is another base), and an
        # existing name is checked before anything is uploaded
        with ThreadPoolExecutor(max_workers=4) as pool:
            digests = dict(zip(chosen, pool.map(file_sha256, chosen), strict=True))
        manifest = {p.name: (d, p.stat().st_size) for p, d in digests.items()}
        try:
            known = repo.get_base_model(self.catalog, name=name)
        except NotFound:
            known = None
        if known is not None:
            if known.fingerprint != fp.sha256 or (
                known.files and {f.name: (f.sha256, f.size) for f in known.files} != manifest
            ):
                raise AdapterExists(
                    f"base model {name!r} is already registered with other files; register "
                    "this one under another name"
                )
            if known.files and all(self.store.exists(blob_key(f.sha256)) for f in known.files):
                return known  # the same bytes, already stored: nothing to send
        total = sum(p.stat().st_size for p in chosen)
        done = 0
        if progress is not None:
            progress(0, total)
        lock = threading.Lock()

        def sent(n: int) -> None:  # chunks of parallel uploads, summed for one bar
            nonlocal done
            with lock:
                done += n
                if progress is not None:
                    progress(done, total)

        def upload(p: Path) -> FileDigest:
            blob = put_blob(self.store, p, sha256=digests[p], progress=sent)
            if not blob.uploaded:
                sent(blob.size)  # already stored: counts as done
            return FileDigest(p.name, blob.sha256, blob.size)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            stored = list(pool.map(upload, chosen))
        log.info("stored base %s (%d bytes) in %.0f ms", name, total,
                 (time.perf_counter() - t0) * 1000)  # fmt: skip
        return repo.register_base_model(
            self.catalog,
            name=name,
            source=str(Path(path).resolve()),
            architecture=fp.architecture,
            parameter_count=fp.parameter_count,
            fingerprint=fp.sha256,
            files=stored,
            tensor_shapes={k: t.shape for k, t in fp.tensors.items()},
        )

    def base(self, name: str) -> BaseModel:
        """A registered base. Raises ``BaseModelNotFound`` (or ``InvalidName``)."""
        validate_name(name, kind="base model name")
        return repo.get_base_model(self.catalog, name=name)

    def base_dir(self, base: str | BaseModel) -> Path:
        """A registered base as a verified local directory in this node's cache.

        The first process of a node downloads it; concurrent ones wait and reuse it.
        """
        record = self.base(base) if isinstance(base, str) else base
        return self.cache.get_base(record, self.store)

    def check_adapter(self, adapter_dir: str | Path, base: BaseModel) -> None:
        """Refuse an adapter that is unsafe or does not fit ``base`` (shapes, modules).

        Shapes come from the catalog, so no node needs the base's bytes to check.
        """
        manifest = inspect_adapter_dir(adapter_dir)
        shapes = base.tensor_shapes
        if not shapes:  # registered before the catalog kept shapes: read the stored base
            shapes = {k: t.shape for k, t in
                      fingerprint_model_dir(self.base_dir(base)).tensors.items()}  # fmt: skip
        check_against_base(manifest, {k: TensorInfo("", tuple(v), "", 0, 0)
                                      for k, v in shapes.items()})  # fmt: skip

    # -- uploaded data files ------------------------------------------------------------------
    def store_file(
        self,
        path: Path,
        *,
        namespace: str,
        filename: str,
        rows: int,
        purpose: str = "fine-tune",
        progress: Progress | None = None,
    ) -> tuple[DataFile, bool]:
        """Store an already validated data file as a blob and record it in ``namespace``.

        Returns:
            (the file, whether it is new; the same content in a namespace is one file).
        """
        validate_name(namespace, kind="namespace")  # before any byte is stored
        if purpose not in file_repo.PURPOSES:
            raise InvalidName(f"purpose must be one of {', '.join(file_repo.PURPOSES)}")
        digest = file_sha256(path)
        known = file_repo.find_file(self.catalog, namespace=namespace, sha256=digest)
        if known is not None:
            return known, False
        total, done = path.stat().st_size, 0

        def sent(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        blob = put_blob(self.store, path, sha256=digest, progress=sent)
        return file_repo.create_file(
            self.catalog, namespace=namespace, filename=filename, purpose=purpose,
            size=blob.size, rows=rows, sha256=blob.sha256,
        )  # fmt: skip

    def delete_file(self, file_id: str, *, namespace: str | None = None) -> DataFile:
        """Delete a file's record (refused while an unfinished job uses it); its bytes go at
        the next ``gc`` if no file, base or upload names them then.

        Finished jobs that named it keep their lineage (id and digest); they cannot be re-run.
        """
        return file_repo.delete_file(self.catalog, file_id=file_id, namespace=namespace)

    def file_path(self, data: str | DataFile, *, namespace: str | None = None) -> Path:
        """An uploaded file as a verified local path in this node's cache."""
        record = (
            file_repo.get_file(self.catalog, file_id=data, namespace=namespace)
            if isinstance(data, str)
            else data
        )
        return self.cache.get_file(record, self.store)

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
        spectrum: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Upload, verify, then record a new ready version of ``ref`` (``namespace/name``).

        ``spectrum`` is the adapter's per-layer spectrum (``orchestrator.spectra``: the
        storage layer does no tensor math), stored with the version.

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
        # the lease comes before the first byte: gc keeps what it finds under a leased prefix
        repo.take_publish_lease(self.catalog, prefix=prefix)
        try:
            return self._publish_leased(prefix, target, base, manifest, job_id=job_id,
                                        dataset_sha256=dataset_sha256, metrics=metrics,
                                        hyperparameters=hyperparameters, tags=tags,
                                        created_by=created_by, spectrum=spectrum)  # fmt: skip
        finally:
            repo.drop_publish_lease(self.catalog, prefix=prefix)

    def _publish_leased(
        self, prefix: str, target: Any, base: BaseModel, manifest: Any, **lineage: Any
    ) -> AdapterVersion:
        digests = []
        t0 = time.perf_counter()
        for path in manifest.files:
            put = self.store.put_file(path, f"{prefix}/{path.name}")
            digests.append(FileDigest(path.name, put.sha256, put.size))
        # ready only once every object is checked again, after the last upload: a missing or
        # short object (whatever removed it) fails the publish instead of the first fetch
        for d in digests:
            key = f"{prefix}/{d.name}"
            try:
                stored = self.store.stat(key)
            except ObjectNotFound:
                raise IntegrityError(f"{key} vanished while publishing") from None
            if stored.size != d.size:
                raise IntegrityError(f"{key}: stored {stored.size} bytes, sent {d.size}")
        log.info("uploaded %s in %.0f ms", prefix, (time.perf_counter() - t0) * 1000)
        hyperparameters = lineage.pop("hyperparameters")
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
            method=manifest.method,
            hyperparameters=hyperparameters or {"lora": manifest.config},
            **lineage,
        )

    def import_adapter(
        self, *, adapter_dir: str | Path, ref: str, base_model: str, tags: Iterable[str] = (),
        metrics: dict[str, Any] | None = None, spectrum: dict[str, Any] | None = None,
    ) -> AdapterVersion:  # fmt: skip
        """Publish an existing PEFT adapter directory (made elsewhere) after checking it."""
        return self.publish(adapter_dir=adapter_dir, ref=ref, base_model=base_model, tags=tags,
                            created_by="import", metrics=metrics, spectrum=spectrum)  # fmt: skip

    # -- read -----------------------------------------------------------------------------------
    def resolve(self, ref: str) -> AdapterVersion:
        return repo.resolve_adapter(self.catalog, ref=parse_ref(ref))

    def ready(self, refs: Iterable[str]) -> set[str]:
        """The exact versions of ``refs`` the catalog holds ready (one query)."""
        return repo.ready_versions(self.catalog, refs=[parse_ref(r) for r in refs])

    def fetch(self, ref: str | AdapterVersion) -> tuple[AdapterVersion, Path]:
        """Bring a version into the node cache (verified); returns its directory.

        ``ref`` is resolved through the catalog; a version record the caller already holds
        (e.g. the serving ingress resolved it) is used as it is: no second catalog query.
        """
        version = ref if isinstance(ref, AdapterVersion) else self.resolve(ref)
        return version, self.cache.get(version, self.store)

    def list(self, **filters: Any) -> list[AdapterVersion]:
        return repo.list_adapter_versions(self.catalog, **filters)

    def promote(
        self, ref: str, alias: str, *, force: bool = False, actor: str | None = None
    ) -> AdapterVersion:
        """Point ``alias`` at ``ref`` through the alias's gate (``storage.catalog.promotion``).

        Raises:
            GateRefused: the version fails the gate and ``force`` is off.
        """
        from storage.catalog import promotion

        version, _ = promotion.promote(self.catalog, ref=parse_ref(ref), alias=alias,
                                       force=force, actor=actor)  # fmt: skip
        return version

    def delete(self, ref: str, *, force: bool = False, actor: str | None = None) -> AdapterVersion:
        """Mark a version deleted (refused while an alias points at it, unless ``force``)."""
        version = repo.delete_adapter_version(self.catalog, ref=parse_ref(ref), force=force,
                                              actor=actor)  # fmt: skip
        self.cache.remove(version)
        return version

    # -- garbage collection ---------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, min_age_s: float = 3600.0) -> GcReport:
        """Delete objects that nothing in the catalog references.

        Orphans of failed publishes, bytes of deleted versions, and blobs no base or uploaded
        file names all go. A publish in flight holds a lease on its prefix, so its objects stay
        whatever ``min_age_s`` says; objects younger than ``min_age_s`` are kept too (blob
        uploads of bases and files take no lease).
        """
        # The order matters. Objects are listed first: any object listed was uploaded after
        # its publish took its lease. Leases are read next, then live versions: a publish
        # creates its version row before it drops its lease, so every listed object is
        # covered by one or the other.
        candidates = [*self.store.list(f"{ADAPTER_ROOT}/"), *self.store.list(f"{BLOB_ROOT}/")]
        leased = repo.leased_prefixes(self.catalog)
        live = repo.live_object_prefixes(self.catalog) | leased
        blobs = repo.live_blob_digests(self.catalog)
        now = time.time()
        orphans, deleted = [], []
        for obj in candidates:
            prefix, name = obj.key.rsplit("/", 1)
            if prefix in live or (prefix == BLOB_ROOT and name in blobs):
                continue
            if obj.modified is not None and now - obj.modified < min_age_s:
                continue
            orphans.append(obj.key)
            if not dry_run:
                self.store.delete(obj.key)
                deleted.append(obj.key)
        return GcReport(orphan_keys=orphans, deleted_keys=deleted)
