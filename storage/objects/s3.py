"""Objects in an S3-compatible bucket through boto3 (AWS, MinIO, R2, SeaweedFS …).

The endpoint comes from ``LORAFLEET_S3_ENDPOINT`` (or the URI's caller); credentials come from
boto3's normal chain. Retries are botocore's own ("standard" mode, bounded attempts), never a
hand-made loop. Large files go as concurrent multipart uploads and ranged downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.errors import ObjectExists, ObjectNotFound, ObjectStoreUnavailable
from storage.objects.base import (
    HashingReader,
    ObjectInfo,
    OnBytes,
    PutResult,
    validate_key,
    verified_destination,
)

log = logging.getLogger(__name__)
MULTIPART_BYTES = 8 * 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _is_not_found(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND


class S3ObjectStore:
    """A bucket and key prefix: ``s3://bucket/prefix``.

    Args:
        bucket: bucket name.
        prefix: key prefix inside the bucket (may be empty).
        endpoint_url: a non-AWS endpoint (MinIO, SeaweedFS, a test server); path-style
            addressing is used with one, since such servers rarely have per-bucket DNS.
        max_attempts: botocore's bounded retries per request.
        client: an already-built boto3 S3 client (tests, custom sessions).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 4,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        client: Any | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=8,
        )

    # -- helpers ----------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, exc: Exception, action: str) -> ObjectStoreUnavailable:
        return ObjectStoreUnavailable(f"object store {self.uri} failed to {action}: {exc}")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (embedded stacks and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise self._unavailable(exc, "check the bucket") from None
            self.client.create_bucket(Bucket=self.bucket)
        except BotoCoreError as exc:
            raise self._unavailable(exc, "reach the bucket") from None

    # -- protocol ---------------------------------------------------------------------------
    def put_file(self, path: Path, key: str, *, progress: OnBytes | None = None) -> PutResult:
        if self.exists(key):
            raise ObjectExists(f"object {key!r} already exists in {self.uri}; keys are immutable")
        full = self._key(key)
        try:
            with open(path, "rb") as fh:
                reader = HashingReader(fh, progress)
                self.client.upload_fileobj(reader, self.bucket, full, Config=self.transfer)
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(exc, f"upload {key!r}") from None
        if int(head["ContentLength"]) != reader.size:
            raise ObjectStoreUnavailable(
                f"{key!r}: store reports {head['ContentLength']} bytes, sent {reader.size}"
            )
        return PutResult(key=key, size=reader.size, sha256=reader.hexdigest())

    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> None:
        full = self._key(key)
        with verified_destination(Path(dest), key, sha256=sha256, size=size) as out:
            try:
                if size is not None and size < MULTIPART_BYTES:
                    # One streamed GET: the transfer manager's HEAD and thread pool would
                    # cost more than they save on an object this small (most adapters).
                    body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
                    while chunk := body.read(1 << 20):
                        out.write(chunk)
                else:
                    self.client.download_fileobj(self.bucket, full, out, Config=self.transfer)
            except ClientError as exc:
                if _is_not_found(exc):
                    raise ObjectNotFound(f"object {key!r} not found in {self.uri}") from None
                raise self._unavailable(exc, f"download {key!r}") from None
            except BotoCoreError as exc:
                raise self._unavailable(exc, f"download {key!r}") from None

    def open(self, key: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"object {key!r} not found in {self.uri}") from None
            raise self._unavailable(exc, f"read {key!r}") from None
        except BotoCoreError as exc:
            raise self._unavailable(exc, f"read {key!r}") from None
        return body

    def stat(self, key: str) -> ObjectInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"object {key!r} not found in {self.uri}") from None
            raise self._unavailable(exc, f"stat {key!r}") from None
        except BotoCoreError as exc:
            raise self._unavailable(exc, f"stat {key!r}") from None
        return ObjectInfo(key, int(head["ContentLength"]))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    modified = obj.get("LastModified")
                    out.append(
                        ObjectInfo(
                            obj["Key"][strip:],
                            int(obj["Size"]),
                            modified.timestamp() if modified else None,
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(exc, "list objects") from None
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if not _is_not_found(exc):
                raise self._unavailable(exc, f"delete {key!r}") from None
        except BotoCoreError as exc:
            raise self._unavailable(exc, f"delete {key!r}") from None
