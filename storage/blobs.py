"""Content-addressed objects: bytes stored once under ``blobs/sha256/<digest>``.

Bases and uploaded data files are blobs: the key is the SHA-256 of the content, so uploading
the same bytes again (another registration of a base, the same dataset from another job or
namespace) stores nothing new, and a reader that knows the digest verifies what it got.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from storage.errors import IntegrityError, InvalidName, ObjectExists
from storage.objects.base import ObjectStore, OnBytes, file_sha256

BLOB_ROOT = "blobs/sha256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def blob_key(sha256: str) -> str:
    """The object key of the blob with this digest."""
    if not _HEX64.fullmatch(sha256):
        raise InvalidName(f"not a SHA-256 digest: {sha256!r}")
    return f"{BLOB_ROOT}/{sha256}"


@dataclass(frozen=True)
class StoredBlob:
    """A blob in the store: digest, size, and whether this call uploaded it."""

    sha256: str
    size: int
    uploaded: bool


def put_blob(
    store: ObjectStore, path: Path, *, sha256: str | None = None, progress: OnBytes | None = None
) -> StoredBlob:
    """Store a local file as a blob unless the store already holds those bytes.

    Args:
        sha256: the file's digest if the caller already computed it (saves one read).
        progress: called with each chunk's byte count as it is uploaded.

    Raises:
        IntegrityError: the file changed while it was uploaded (the partial blob is removed).
    """
    digest = sha256 or file_sha256(path)
    key = blob_key(digest)
    size = Path(path).stat().st_size
    if store.exists(key):
        if store.stat(key).size == size:
            return StoredBlob(digest, size, uploaded=False)
        store.delete(key)  # a truncated leftover: content addressing makes replacing it safe
    try:
        put = store.put_file(Path(path), key, progress=progress)
    except ObjectExists:  # another uploader of the same bytes won the race
        return StoredBlob(digest, size, uploaded=False)
    if put.sha256 != digest:
        store.delete(key)
        raise IntegrityError(f"{path} changed while it was uploaded; upload it again")
    return StoredBlob(digest, put.size, uploaded=True)
