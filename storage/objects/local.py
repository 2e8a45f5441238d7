"""Objects as files under a local directory (the embedded default: ``file://…``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from storage.errors import ObjectExists, ObjectNotFound
from storage.objects.base import (
    CHUNK_BYTES,
    HashingReader,
    ObjectInfo,
    OnBytes,
    PutResult,
    validate_key,
    verified_destination,
)


class LocalObjectStore:
    """A directory of immutable files. Writes are atomic: temp file, fsync, hard link."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_file(self, path: Path, key: str, *, progress: OnBytes | None = None) -> PutResult:
        target = self._path(key)
        if target.exists():
            raise ObjectExists(f"object {key!r} already exists; keys are immutable")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                reader = HashingReader(src, progress)
                for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            try:
                os.link(tmp_name, target)  # fails if the key appeared meanwhile: no overwrite
            except FileExistsError:
                raise ObjectExists(f"object {key!r} already exists; keys are immutable") from None
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return PutResult(key=key, size=reader.size, sha256=reader.hexdigest())

    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"object {key!r} not found in {self.uri}")
        with (
            verified_destination(Path(dest), key, sha256=sha256, size=size) as out,
            open(source, "rb") as src,
        ):
            for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                out.write(chunk)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key!r} not found in {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key!r} not found in {self.uri}") from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = p.stat()
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
