"""Domain objects the catalog returns: plain frozen dataclasses, never ORM rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Namespace:
    id: int
    name: str
    max_concurrent_jobs: int | None = None
    max_gpus: float | None = None
    max_cpus: float | None = None
    max_priority: int = 0  # highest job priority its members may ask for (set by an admin)


TOKEN_SCOPES = ("read", "write", "admin")  # each includes the ones before it


@dataclass(frozen=True)
class ApiToken:
    """A namespace's bearer token as the catalog describes it (never the secret itself)."""

    id: int
    namespace: str
    name: str
    scope: str
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


def files_digest(files: tuple[FileDigest, ...]) -> str:
    """One SHA-256 over a set of stored files (name, digest, size), in name order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{f.sha256}\0{f.size}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """One stored file of an adapter version or a base (name, SHA-256, bytes)."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BaseModel:
    """A registered base. ``source`` is where it was registered from (information only: no
    node reads it); its bytes are ``files`` in the object store, content-addressed."""

    id: int
    name: str
    source: str
    architecture: str
    parameter_count: int
    fingerprint: str
    files: tuple[FileDigest, ...] = ()
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def files_digest(self) -> str:
        """One digest over every stored file (name, SHA-256, size): what a node caches by."""
        return files_digest(self.files)


@dataclass(frozen=True)
class DataFile:
    """An uploaded data file (``file-…``): validated JSONL, content-addressed by ``sha256``."""

    id: str
    namespace: str
    filename: str
    purpose: str
    bytes: int
    rows: int
    sha256: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class AdapterVersion:
    """An immutable adapter version with its lineage."""

    id: int
    namespace: str
    name: str
    version: int
    state: str
    base_model: BaseModel
    object_prefix: str
    files: tuple[FileDigest, ...]
    total_bytes: int
    r: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool
    job_id: str | None
    dataset_sha256: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    created_by: str | None = None
    created_at: datetime | None = None
    aliases: tuple[str, ...] = ()
    spectrum: dict[str, Any] | None = None  # per-layer singular values (stored at publish)
    method: str = "lora"  # or "dora"

    @property
    def ref(self) -> str:
        """``namespace/name:version``: the exact, immutable reference."""
        return f"{self.namespace}/{self.name}:{self.version}"

    @property
    def digest(self) -> str:
        """One digest for the whole version (over the per-file digests, in name order)."""
        return files_digest(self.files)
