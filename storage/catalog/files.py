"""Uploaded data files in the catalog: ``file-…`` ids, namespace-scoped, content-addressed.

A file row records what was validated and stored; the bytes live in the object store under
``blob_key(sha256)``, shared by every row (of any namespace) with the same content. Rows never
leave this module; callers get ``DataFile``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, tuple_

from storage.catalog.db import Catalog
from storage.catalog.domain import DataFile
from storage.catalog.models import FileRow, JobRow, NamespaceRow
from storage.catalog.repository import _namespace_row
from storage.errors import InUse, NotFound
from storage.names import validate_name

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSES = ("fine-tune",)


class FileNotFound(NotFound):
    """No such file (or not in the caller's namespace)."""


def is_file_id(value: str) -> bool:
    """Whether ``value`` has the shape of a file id (``file-`` + 24 hex digits)."""
    return bool(FILE_ID_RE.fullmatch(value))


def new_file_id() -> str:
    """A fresh file id: ``file-`` + 24 random hex digits."""
    return f"file-{uuid.uuid4().hex[:24]}"


def _file(row: FileRow, namespace: str) -> DataFile:
    return DataFile(row.id, namespace, row.filename, row.purpose, row.bytes, row.rows,
                    row.sha256, row.created_at)  # fmt: skip


def find_file(db: Catalog, *, namespace: str, sha256: str) -> DataFile | None:
    """The oldest file of ``namespace`` with this content, or None."""
    with db.session() as s:
        row = s.execute(
            select(FileRow, NamespaceRow.name)
            .join(NamespaceRow, NamespaceRow.id == FileRow.namespace_id)
            .where(NamespaceRow.name == namespace, FileRow.sha256 == sha256)
            .order_by(FileRow.created_at)
            .limit(1)
        ).first()
        return _file(row[0], row[1]) if row else None


def create_file(
    db: Catalog, *, namespace: str, filename: str, purpose: str, size: int, rows: int, sha256: str
) -> tuple[DataFile, bool]:
    """Record a stored file; the same content in the same namespace returns the first record.

    Returns:
        (the file, whether it was created now).
    """
    validate_name(namespace, kind="namespace")
    existing = find_file(db, namespace=namespace, sha256=sha256)
    if existing is not None:
        return existing, False
    try:
        with db.session() as s:
            ns = _namespace_row(s, namespace, create=True)
            row = FileRow(id=new_file_id(), namespace_id=ns.id, filename=filename[:255],
                          purpose=purpose, bytes=size, rows=rows, sha256=sha256)  # fmt: skip
            s.add(row)
            s.flush()
            return _file(row, namespace), True
    except sa_exc.IntegrityError:  # the same content was recorded concurrently: that one
        again = find_file(db, namespace=namespace, sha256=sha256)
        if again is None:
            raise
        return again, False


def get_file(db: Catalog, *, file_id: str, namespace: str | None = None) -> DataFile:
    """Raises ``FileNotFound`` (also for another namespace's file when ``namespace`` is given)."""
    if not is_file_id(file_id):
        raise FileNotFound(f"file {file_id!r} not found")
    with db.session() as s:
        row = s.execute(
            select(FileRow, NamespaceRow.name)
            .join(NamespaceRow, NamespaceRow.id == FileRow.namespace_id)
            .where(FileRow.id == file_id)
        ).first()
        if row is None or (namespace is not None and row[1] != namespace):
            raise FileNotFound(f"file {file_id} not found")
        return _file(row[0], row[1])


def _files_query(namespace: str | None) -> Any:
    q = select(FileRow, NamespaceRow.name).join(
        NamespaceRow, NamespaceRow.id == FileRow.namespace_id
    )
    if namespace is None:
        return q
    # by id, looked up first, so that ix_files_namespace_created serves the page
    ns_id = select(NamespaceRow.id).where(NamespaceRow.name == namespace).scalar_subquery()
    return q.where(FileRow.namespace_id == ns_id)


def list_files(db: Catalog, *, namespace: str | None = None) -> list[DataFile]:
    """Files, newest first; one namespace's when given."""
    with db.session() as s:
        q = _files_query(namespace).order_by(FileRow.created_at.desc(), FileRow.id.desc())
        return [_file(r, n) for r, n in s.execute(q)]


def page_files(
    db: Catalog, *, namespace: str | None = None, limit: int = 20, after: str | None = None
) -> tuple[list[DataFile], bool]:
    """One page of files, newest first, after file ``after`` (a keyset cursor), and whether
    more follow.

    Raises:
        NotFound: ``after`` is not a file (of ``namespace``, when given).
    """
    with db.session() as s:
        q = _files_query(namespace)
        if after is not None:
            cursor = s.execute(_files_query(namespace).where(FileRow.id == after)).first()
            if cursor is None:
                raise NotFound(f"file {after} not found")
            at = cursor[0].created_at
            q = q.where(tuple_(FileRow.created_at, FileRow.id) < tuple_(at, after))  # index range
        q = q.order_by(FileRow.created_at.desc(), FileRow.id.desc())  # one backward index scan
        rows = s.execute(q.limit(limit + 1)).all()
        return [_file(r, n) for r, n in rows[:limit]], len(rows) > limit


UNFINISHED = ("queued", "starting", "running", "retrying")  # states a job may still train in


def delete_file(db: Catalog, *, file_id: str, namespace: str | None = None) -> DataFile:
    """Delete a file's record (its bytes stay until ``gc``: an upload of the same content may
    have counted on them).

    Raises:
        InUse: a queued, running or retrying job trains on it (naming the jobs; nothing
            changed).
    """
    f = get_file(db, file_id=file_id, namespace=namespace)
    with db.session() as s:
        ns_id = s.scalar(select(NamespaceRow.id).where(NamespaceRow.name == f.namespace))
        users = [
            job_id
            for job_id, spec in s.execute(
                select(JobRow.id, JobRow.spec).where(
                    JobRow.namespace_id == ns_id, JobRow.state.in_(UNFINISHED)
                )
            )
            if f.id in ((spec or {}).get("training_data"), (spec or {}).get("validation_data"))
        ]
        if users:
            shown = ", ".join(sorted(users)[:5]) + (" …" if len(users) > 5 else "")
            raise InUse(f"file {f.id} is used by {len(users)} unfinished job(s): {shown}; "
                        "cancel them or wait until they end")  # fmt: skip
        row = s.get(FileRow, f.id)
        if row is not None:
            s.delete(row)
        s.flush()
    return f
