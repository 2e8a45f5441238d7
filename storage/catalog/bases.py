"""Registered base models: their stored files, fingerprint and tensor shapes."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select

from storage.catalog.db import Catalog
from storage.catalog.domain import (
    BaseModel,
    FileDigest,
)
from storage.catalog.models import (
    BaseModelRow,
)
from storage.errors import (
    AdapterExists,
    BaseModelNotFound,
)
from storage.names import validate_name


def _base(row: BaseModelRow) -> BaseModel:
    stored = sorted((row.files or {}).items())
    files = tuple(FileDigest(name, f["sha256"], int(f["size"])) for name, f in stored)
    shapes = {k: tuple(v) for k, v in (row.tensor_shapes or {}).items()}
    return BaseModel(
        row.id, row.name, row.source, row.architecture, row.parameter_count, row.fingerprint,
        files, shapes,
    )  # fmt: skip


def register_base_model(
    db: Catalog,
    *,
    name: str,
    source: str,
    architecture: str,
    parameter_count: int,
    fingerprint: str,
    files: Iterable[FileDigest] = (),
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
) -> BaseModel:
    """Register a base (idempotent for the same fingerprint).

    A base registered before bases lived in the object store (no ``files``) gets its stored
    files recorded by the next registration of the same bytes.

    Raises:
        AdapterExists: the name is taken by a base with another fingerprint.
    """
    validate_name(name, kind="base model name")
    manifest = {f.name: {"sha256": f.sha256, "size": f.size} for f in files}
    shapes = {k: list(v) for k, v in (tensor_shapes or {}).items()}
    with db.session() as s:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is not None:
            if row.fingerprint != fingerprint:
                raise AdapterExists(
                    f"base model {name!r} is already registered with another fingerprint "
                    f"({row.fingerprint[:12]}…, this one {fingerprint[:12]}…)"
                )
            if manifest and not row.files:
                row.files, row.tensor_shapes = manifest, shapes
                s.flush()
            return _base(row)
        row = BaseModelRow(
            name=name,
            source=source,
            architecture=architecture,
            parameter_count=parameter_count,
            fingerprint=fingerprint,
            files=manifest or None,
            tensor_shapes=shapes or None,
        )
        s.add(row)
        s.flush()
        return _base(row)


def get_base_model(db: Catalog, *, name: str) -> BaseModel:
    """Raises ``BaseModelNotFound``."""
    with db.session() as s:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is None:
            raise BaseModelNotFound(f"base model {name!r} is not registered")
        return _base(row)


def list_base_models(db: Catalog) -> list[BaseModel]:
    with db.session() as s:
        return [_base(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.name))]
