"""Node-local adapter cache: verified downloads, atomic placement, one download per adapter.

An entry is a directory ``<root>/<namespace>/<name>/<version>-<digest12>/`` holding the
adapter's files. It is assembled in a temporary sibling directory, every file verified against
the catalog's SHA-256, and renamed into place only when complete — so a reader never sees a
partial entry and a corrupt object leaves nothing behind. Concurrent requests for one entry
share a single download: threads of one process through a per-key lock, processes of one node
through an ``flock`` on a per-key lock file. Entries are evicted least-recently-used once the
cache exceeds ``max_bytes``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.catalog.domain import AdapterVersion
from storage.names import validate_name
from storage.objects.base import ObjectStore

log = logging.getLogger(__name__)
COMPLETE = ".complete"


class AdapterCache:
    """A size-bounded directory of verified adapter versions.

    Args:
        root: cache directory (node-local disk).
        max_bytes: eviction threshold; the entry just fetched is never evicted.
    """

    def __init__(self, root: str | Path, *, max_bytes: int = 10 * 1024**3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.downloads = 0  # objects fetched from the store (a metric, and what tests count)

    def entry_dir(self, version: AdapterVersion) -> Path:
        validate_name(version.namespace, kind="namespace")
        validate_name(version.name, kind="adapter name")
        return (
            self.root
            / version.namespace
            / version.name
            / f"{version.version}-{version.digest[:12]}"
        )

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

    def get(self, version: AdapterVersion, store: ObjectStore) -> Path:
        """The local directory of ``version``, downloading and verifying it on a miss.

        Raises:
            IntegrityError: an object's bytes do not match the catalog; nothing is cached.
            ObjectNotFound, ObjectStoreUnavailable: from the store.
        """
        entry = self.entry_dir(version)
        if (entry / COMPLETE).is_file():
            os.utime(entry / COMPLETE)  # LRU clock
            return entry
        with self._thread_lock(str(entry)), self._node_lock(entry):
            if (entry / COMPLETE).is_file():  # another thread or process filled it meanwhile
                os.utime(entry / COMPLETE)
                return entry
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
            try:
                for f in version.files:
                    store.get_file(
                        f"{version.object_prefix}/{f.name}",
                        tmp / f.name,
                        sha256=f.sha256,
                        size=f.size,
                    )
                    self.downloads += 1
                (tmp / COMPLETE).write_text(version.digest + "\n")
                if entry.exists():  # an incomplete leftover from a crashed process
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info(
                "cached %s (%d bytes) in %.1f ms",
                version.ref,
                version.total_bytes,
                (time.perf_counter() - t0) * 1000,
            )
        self.evict(keep=entry)
        return entry

    def entries(self) -> list[tuple[Path, float, int]]:
        """(directory, last use, bytes) of every complete entry."""
        out = []
        for marker in self.root.glob(f"*/*/*/{COMPLETE}"):
            d = marker.parent
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append((d, marker.stat().st_mtime, size))
        return out

    def evict(self, *, keep: Path | None = None) -> list[Path]:
        """Remove least-recently-used entries until the cache fits ``max_bytes``."""
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
