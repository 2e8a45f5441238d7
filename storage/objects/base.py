"""The object-store seam: one small protocol, implemented for a local directory and S3.

Keys are ``/``-separated and validated (no empty, ``.`` or ``..`` segment, no leading slash),
so a key can never leave the store's root or prefix. Keys are immutable: ``put_file`` refuses
an existing key. Every upload hashes the bytes it sends (SHA-256) and every download verifies
the bytes it received against the digest the caller recorded, leaving nothing behind on a
mismatch.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from storage.errors import IntegrityError, InvalidName

CHUNK_BYTES = 1 << 20
OnBytes = Callable[[int], None]  # called with each chunk's byte count as it passes
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


def validate_key(key: str) -> str:
    """Return ``key`` if every segment is safe, else raise ``InvalidName``."""
    if not isinstance(key, str) or not key or key.startswith("/") or len(key) > 1024:
        raise InvalidName(f"invalid object key {key!r}")
    for seg in key.split("/"):
        if seg in (".", "..") or not _SEGMENT.fullmatch(seg):
            raise InvalidName(f"invalid object key {key!r}: bad segment {seg!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size in bytes and last-modified time (epoch seconds, if known)."""

    key: str
    size: int
    modified: float | None = None


@dataclass(frozen=True)
class PutResult:
    """What was written: key, size and the SHA-256 of the bytes sent."""

    key: str
    size: int
    sha256: str


@runtime_checkable
class ObjectStore(Protocol):
    """Bytes by key. Implementations: ``LocalObjectStore`` (file://), ``S3ObjectStore`` (s3://)."""

    uri: str

    def put_file(self, path: Path, key: str, *, progress: OnBytes | None = None) -> PutResult:
        """Upload a local file under a new key; raises ``ObjectExists`` if the key is taken.

        ``progress`` is called with the byte count of each chunk as it is sent.
        """
        ...

    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> None:
        """Download to ``dest`` atomically, verifying size and digest when given."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size of the object; raises ``ObjectNotFound``."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (no error if it is already gone)."""
        ...


def has_digest(store: ObjectStore, key: str, sha256: str) -> bool:
    """Whether the object under ``key`` exists and its bytes hash to ``sha256`` (streams it)."""
    if not store.exists(key):
        return False
    h = hashlib.sha256()
    with store.open(key) as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest() == sha256


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


class HashingReader:
    """A forward-only reader that hashes what passes through it.

    It deliberately has no ``seek``/``tell``: upload libraries then read it strictly in order,
    so the digest is of exactly the bytes sent.
    """

    def __init__(self, fh: BinaryIO, progress: OnBytes | None = None) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self._progress = progress
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._hash.update(data)
        self.size += len(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class HashingWriter:
    """A forward-only writer that hashes what passes through it.

    No ``seek``/``tell`` either: a concurrent ranged download then delivers its parts in order
    (buffering the early ones), so hashing overlaps the transfer instead of following it.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextmanager
def verified_destination(
    dest: Path, key: str, *, sha256: str | None, size: int | None
) -> Iterator[HashingWriter]:
    """Yield a hashing writer onto a temporary file beside ``dest``; on exit verify what was
    written and rename it into place.

    On any failure (including a digest or size mismatch) the temporary file is removed and
    ``dest`` is left as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = HashingWriter(fh)
            yield writer
        if size is not None and writer.size != size:
            raise IntegrityError(f"{key}: expected {size} bytes, got {writer.size}")
        if sha256 is not None and writer.hexdigest() != sha256:
            raise IntegrityError(
                f"{key}: SHA-256 mismatch (expected {sha256}, got {writer.hexdigest()})"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
