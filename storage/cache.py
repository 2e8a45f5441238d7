"""The node cache: verified downloads, atomic placement, one download per entry per node.

Everything a node reads from the shared object store goes through here: adapter versions,
bases and uploaded data files. An entry is a directory assembled in a temporary sibling, every
file verified against the catalog's SHA-256, and renamed into place only when complete — so a
reader never sees a partial entry and a corrupt object leaves nothing behind. Concurrent
requests for one entry share a single download: threads of one process through a per-key
lock, processes of one node through an ``flock`` on a per-key lock file (workers of one node
wait for the first one; they do not download again).

Layout under ``root``:

- ``<namespace>/<name>/<version>-<digest12>/``: an adapter version (LRU-evicted past
  ``max_bytes``);
- ``_bases/<name>-<files digest16>/``: a base, its files under their own names (never evicted:
  a running job or replica maps them);
- ``_files/<sha256>/data.jsonl``: an uploaded data file.

Names starting with ``_`` cannot be namespaces, so the three never collide. Every download is
appended to ``_downloads.jsonl`` (key, bytes, pid): the node's transfer log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from storage.blobs import blob_key
from storage.catalog.domain import AdapterVersion, BaseModel, DataFile
from storage.errors import IntegrityError, InvalidName
from storage.names import validate_name
from storage.objects.base import ObjectStore, validate_key

log = logging.getLogger(__name__)
COMPLETE = ".complete"
DOWNLOAD_LOG = "_downloads.jsonl"
DATA_FILE_NAME = "data.jsonl"
# (object key, file name in the entry, sha256, size)
Wanted = tuple[str, str, str, int]


def _check_file_name(name: str) -> None:
    """A catalog file name becomes a path in an entry: one safe segment only."""
    if "/" in name:
        raise InvalidName(f"invalid file name {name!r}")
    validate_key(name)


class AdapterCache:
    """The node's size-bounded directory of verified objects (adapters, bases, data files).

    Args:
        root: cache directory (node-local disk).
        max_bytes: adapter eviction threshold; the entry just fetched is never evicted.
    """

    def __init__(self, root: str | Path, *, max_bytes: int = 10 * 1024**3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.downloads = 0  # objects fetched by this process (a metric, and what tests count)
        self.downloaded_bytes = 0

    # -- entries --------------------------------------------------------------------------
    def entry_dir(self, version: AdapterVersion) -> Path:
        validate_name(version.namespace, kind="namespace")
        validate_name(version.name, kind="adapter name")
        return (
            self.root
            / version.namespace
            / version.name
            / f"{version.version}-{version.digest[:12]}"
        )

    def base_dir(self, base: BaseModel) -> Path:
        """Where a base's entry lives: keyed by all its files' digests, so any changed byte
        (weights, tokenizer, chat template) is another entry."""
        validate_name(base.name, kind="base model name")
        return self.root / "_bases" / f"{base.name}-{base.files_digest[:16]}"

    def file_dir(self, data: DataFile) -> Path:
        """Where an uploaded file's entry lives (by content digest)."""
        blob_key(data.sha256)  # validates the digest before it becomes a path
        return self.root / "_files" / data.sha256

    # -- fetching -------------------------------------------------------------------------
    def get(self, version: AdapterVersion, store: ObjectStore) -> Path:
        """The local directory of an adapter version, downloading and verifying it on a miss.

        Raises:
            IntegrityError: an object's bytes do not match the catalog; nothing is cached.
            ObjectNotFound, ObjectStoreUnavailable: from the store.
        """
        wanted = [(f"{version.object_prefix}/{f.name}", f.name, f.sha256, f.size)
                  for f in version.files]  # fmt: skip
        entry = self._fill(self.entry_dir(version), wanted, store, what=version.ref)
        self.evict(keep=entry)
        return entry

    def get_base(self, base: BaseModel, store: ObjectStore) -> Path:
        """The local directory of a registered base (config, tokenizer, safetensors).

        Raises:
            IntegrityError: the base has no stored files (registered before bases lived in the
                object store: register it again), or a file's bytes do not match.
        """
        if not base.files:
            raise IntegrityError(
                f"base {base.name!r} has no files in the object store; register it again "
                "(lorafleet base register) to upload them"
            )
        wanted = [(blob_key(f.sha256), f.name, f.sha256, f.size) for f in base.files]
        return self._fill(self.base_dir(base), wanted, store, what=f"base {base.name}")

    def get_file(self, data: DataFile, store: ObjectStore) -> Path:
        """The local path of an uploaded data file."""
        wanted = [(blob_key(data.sha256), DATA_FILE_NAME, data.sha256, data.bytes)]
        return self._fill(self.file_dir(data), wanted, store, what=data.id) / DATA_FILE_NAME

    def _thread_lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextmanager
    def _node_lock(self, entry: Path) -> Iterator[None]:
        lock_path = entry.parent / f".{entry.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _fill(
        self, entry: Path, wanted: Sequence[Wanted], store: ObjectStore, *, what: str
    ) -> Path:
        if (entry / COMPLETE).is_file():
            os.utime(entry / COMPLETE)  # LRU clock
            return entry
        with self._thread_lock(str(entry)), self._node_lock(entry):
            if (entry / COMPLETE).is_file():  # another thread or process filled it meanwhile
                os.utime(entry / COMPLETE)
                return entry
            for stale in entry.parent.glob(f".{entry.name}.*"):
                # a download cut short (the process was killed): only the lock holder fills
                # this entry, so whatever temporary directory is left is nobody's
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
            try:
                for key, name, sha256, size in wanted:
                    _check_file_name(name)
                    store.get_file(key, tmp / name, sha256=sha256, size=size)
                    self._record(key, size)
                (tmp / COMPLETE).write_text(json.dumps([w[2] for w in wanted]) + "\n")
                if entry.exists():  # an incomplete leftover from a crashed process
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            total = sum(w[3] for w in wanted)
            log.info("cached %s (%d bytes) in %.1f ms", what, total,
                     (time.perf_counter() - t0) * 1000)  # fmt: skip
        return entry

    def _record(self, key: str, size: int) -> None:
        self.downloads += 1
        self.downloaded_bytes += size
        line = json.dumps({"key": key, "bytes": size, "pid": os.getpid(), "ts": time.time()})
        with open(self.root / DOWNLOAD_LOG, "a") as fh:  # O_APPEND: lines never interleave
            fh.write(line + "\n")

    def download_log(self) -> list[dict[str, object]]:
        """Every download this node's cache made, oldest first (all processes)."""
        path = self.root / DOWNLOAD_LOG
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- adapter eviction -------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, float, int]]:
        """(directory, last use, bytes) of every complete adapter entry."""
        out = []
        for marker in self.root.glob(f"*/*/*/{COMPLETE}"):
            d = marker.parent
            if d.parts[len(self.root.parts)].startswith("_"):
                continue
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append((d, marker.stat().st_mtime, size))
        return out

    def evict(self, *, keep: Path | None = None) -> list[Path]:
        """Remove least-recently-used adapter entries until they fit ``max_bytes``."""
        entries = sorted(self.entries(), key=lambda e: e[1])
        total = sum(e[2] for e in entries)
        removed = []
        for d, _, size in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and d == keep:
                continue
            with self._node_lock(d):
                shutil.rmtree(d, ignore_errors=True)
            total -= size
            removed.append(d)
        return removed

    def remove(self, version: AdapterVersion) -> None:
        """Drop one entry (e.g. after the catalog deleted it)."""
        shutil.rmtree(self.entry_dir(version), ignore_errors=True)
