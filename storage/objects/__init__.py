"""Object stores chosen by URI scheme: ``file://…`` (local directory) or ``s3://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from storage.errors import InvalidName
from storage.objects.base import (
    ObjectInfo,
    ObjectStore,
    PutResult,
    file_sha256,
    has_digest,
    validate_key,
)
from storage.objects.local import LocalObjectStore

if TYPE_CHECKING:
    from storage.objects.s3 import S3ObjectStore


def __getattr__(name: str) -> Any:
    # boto3 takes a seventh of a second to import: only S3 users pay it
    if name == "S3ObjectStore":
        from storage.objects.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(name)


def open_store(uri: str, *, s3_endpoint: str | None = None) -> ObjectStore:
    """Build the store a URI names.

    Args:
        uri: ``file:///abs/path``, a plain local path, or ``s3://bucket[/prefix]``.
        s3_endpoint: endpoint URL for S3-compatible servers (MinIO, SeaweedFS …).

    Raises:
        InvalidName: an unsupported scheme or a missing bucket.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme else uri
        return LocalObjectStore(Path(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidName(f"object store URI {uri!r} names no bucket")
        from storage.objects.s3 import S3ObjectStore

        return S3ObjectStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=s3_endpoint)
    raise InvalidName(f"unsupported object store URI {uri!r}: use file://… or s3://bucket/prefix")


__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "PutResult",
    "S3ObjectStore",
    "file_sha256",
    "has_digest",
    "open_store",
    "validate_key",
]
