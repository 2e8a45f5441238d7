"""Directories handed from one node to another through the object store.

A writer (rank 0 of a training run) uploads a directory's files under a prefix and then a
``manifest.json`` naming each file's SHA-256 and size; the manifest is written last, so its
presence means the directory is complete. A reader on any other node downloads the files and
verifies each against the manifest. Checkpoints and finished adapters travel this way.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from storage.errors import IntegrityError
from storage.objects.base import ObjectStore, validate_key

MANIFEST = "manifest.json"
_STEP = re.compile(r"/step-(\d{8})$")


def stage_dir(store: ObjectStore, local_dir: Path, prefix: str) -> dict[str, Any]:
    """Upload every regular file of ``local_dir`` under ``prefix``, then the manifest.

    Whatever an earlier, interrupted attempt left under ``prefix`` is removed first (keys are
    immutable, so it could not be overwritten).

    Returns:
        The manifest: ``{"files": {name: {"sha256", "size"}}}``.
    """
    validate_key(prefix)
    remove_staged(store, prefix)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(local_dir).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            put = store.put_file(path, f"{prefix}/{path.name}")
            files[path.name] = {"sha256": put.sha256, "size": put.size}
    manifest = {"files": files}
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / MANIFEST
        m.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        store.put_file(m, f"{prefix}/{MANIFEST}")
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """The manifest of a staged directory.

    Raises:
        ObjectNotFound: nothing complete was staged under ``prefix``.
    """
    with store.open(f"{prefix}/{MANIFEST}") as fh:
        data = json.loads(fh.read())
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise IntegrityError(f"{prefix}/{MANIFEST} is not a staging manifest")
    return data


def fetch_staged(store: ObjectStore, prefix: str, dest: Path) -> Path:
    """Download a staged directory into ``dest`` (created), each file verified.

    Raises:
        ObjectNotFound: no complete staged directory under ``prefix``.
        IntegrityError: a file's bytes differ from the manifest.
    """
    manifest = read_manifest(store, prefix)
    dest.mkdir(parents=True, exist_ok=True)
    for name, meta in sorted(manifest["files"].items()):
        if "/" in name:
            raise IntegrityError(f"{prefix}/{MANIFEST} names a file outside the directory")
        store.get_file(f"{prefix}/{name}", dest / name, sha256=meta["sha256"], size=meta["size"])
    return dest


def remove_staged(store: ObjectStore, prefix: str) -> int:
    """Delete a staged directory's objects, the manifest first (so a removal cut short never
    leaves a complete-looking directory with files missing); returns how many."""
    objects = store.list(f"{prefix}/")
    manifest = f"{prefix}/{MANIFEST}"
    for obj in sorted(objects, key=lambda o: o.key != manifest):
        store.delete(obj.key)
    return len(objects)


def checkpoint_root(run_key: str) -> str:
    """The prefix under which the checkpoints of ``run_key`` (a job id) are staged."""
    return f"checkpoints/{validate_key(run_key)}"


def checkpoint_prefix(run_key: str, step: int) -> str:
    """Where the checkpoint of ``run_key`` at ``step`` is staged."""
    return f"{checkpoint_root(run_key)}/step-{step:08d}"


def checkpoints(store: ObjectStore, run_key: str) -> list[tuple[int, str]]:
    """(step, prefix) of every complete checkpoint of ``run_key``, newest first."""
    found = []
    for obj in store.list(f"checkpoints/{run_key}/"):
        if obj.key.endswith(f"/{MANIFEST}"):
            prefix = obj.key.rsplit("/", 1)[0]
            m = _STEP.search(prefix)
            if m:
                found.append((int(m.group(1)), prefix))
    return sorted(found, reverse=True)


def latest_checkpoint(store: ObjectStore, run_key: str) -> tuple[int, str] | None:
    """(step, prefix) of the newest complete checkpoint of ``run_key``, or None."""
    found = checkpoints(store, run_key)
    return found[0] if found else None


def prune_checkpoints(store: ObjectStore, run_key: str, *, keep: int = 2) -> list[str]:
    """Remove all but the ``keep`` newest complete checkpoints of ``run_key``; returns prefixes."""
    doomed = [prefix for _, prefix in checkpoints(store, run_key)[keep:]][::-1]
    for prefix in doomed:
        remove_staged(store, prefix)
    return doomed
