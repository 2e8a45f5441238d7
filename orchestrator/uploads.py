"""Data in, paths out: uploaded files and local job inputs become catalog ids.

The cluster never reads a path on a caller's behalf. A dataset enters as an upload — over
``POST /v1/files`` or from the CLI, which uploads the local paths a spec names — validated row
by row, stored content-addressed in the object store and recorded as ``file-…`` in the
caller's namespace. A local base directory named by a CLI spec is registered (uploaded) the
same way. What reaches the catalog is ids and names only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.catalog import files as file_repo
from storage.catalog.domain import BaseModel, DataFile
from storage.errors import NotFound
from storage.names import NAME_RE
from storage.registry import Registry
from workers.datasets import MAX_LINE_BYTES, count_valid_rows
from workers.errors import DatasetError
from workers.method_data import validate_any_row

DATA_FIELDS = ("training_data", "validation_data")
Progress = Callable[[int, int], None]


class UploadTooLarge(DatasetError):
    """An upload is over the configured size limit (``max_upload_bytes``)."""


def check_size(size: int, limit: int, *, filename: str) -> None:
    """Raise ``UploadTooLarge`` when ``size`` exceeds ``limit``."""
    if size > limit:
        raise UploadTooLarge(
            f"{filename} is {size:,} bytes; the limit is {limit:,} (LORAFLEET_MAX_UPLOAD_BYTES)"
        )


def upload_dataset(
    registry: Registry,
    path: Path,
    *,
    namespace: str,
    filename: str,
    max_bytes: int,
    max_line: int = MAX_LINE_BYTES,
    progress: Progress | None = None,
) -> tuple[DataFile, bool]:
    """Validate a JSONL file row by row, then store and record it in ``namespace``.

    Args:
        filename: the name errors and listings show (an upload's own name, never a server
            path).

    Returns:
        (the file, whether it is new: identical content in a namespace is stored once).

    Raises:
        UploadTooLarge, DatasetError (naming ``filename:line``).
    """
    check_size(path.stat().st_size, max_bytes, filename=filename)
    # any supported row (supervised, preference, prompt): the job checks its method's rule
    rows = count_valid_rows(path, name=filename, max_line=max_line, check=validate_any_row)
    return registry.store_file(path, namespace=namespace, filename=filename, rows=rows,
                               progress=progress)  # fmt: skip


def _local_path(value: str, spec_dir: Path) -> Path | None:
    """A spec's local path (``file://`` or plain, relative to the cwd or the spec's folder)."""
    raw = Path(value.removeprefix("file://")).expanduser()
    for candidate in (raw, spec_dir / raw):
        if candidate.exists():
            return candidate
    return None


def base_name_for(path: Path) -> str:
    """A stable catalog name for a local base directory (its name + a digest of its path)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.name.lower()[:40])
    return f"{stem.strip('-._') or 'base'}-{digest}"


def localize_inputs(
    data: dict[str, Any],
    registry: Registry,
    *,
    spec_dir: Path,
    max_bytes: int,
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[str], Progress | None] = lambda _: None,
) -> dict[str, Any]:
    """Replace the local paths a (CLI) spec names by what the cluster can read.

    ``training_data`` / ``validation_data`` paths are validated and uploaded (identical
    content is not uploaded again) and replaced by file ids; a ``base_model`` that is a local
    directory rather than a registered name is registered (uploaded). Ids and names are left
    as they are; the spec's own validation judges them afterwards.

    Raises:
        SpecError: a path that does not exist (naming the field); DatasetError.
    """
    from orchestrator.spec import SpecError

    out = dict(data)
    namespace = out.get("namespace")
    for field in DATA_FIELDS:
        value = out.get(field)
        if not isinstance(value, str) or file_repo.is_file_id(value):
            continue
        path = _local_path(value, spec_dir)
        if path is None or not path.is_file():
            raise SpecError(field, f"{value} is neither a file id nor a local file")
        if not isinstance(namespace, str) or not NAME_RE.fullmatch(namespace):
            break  # the spec's validation names the namespace problem
        record, created = upload_dataset(
            registry, path, namespace=namespace, filename=path.name, max_bytes=max_bytes,
            progress=progress(path.name),
        )  # fmt: skip
        verb = "uploaded" if created else "already uploaded"
        say(f"{field}: {verb} {path.name} as {record.id} ({record.rows} rows, "
            f"sha256 {record.sha256[:12]})")  # fmt: skip
        out[field] = record.id
    base = out.get("base_model")
    if isinstance(base, str):
        stored = local_base(registry, base, spec_dir=spec_dir, progress=progress)
        if stored is not None:
            say(f"base_model: {base} registered as {stored.name} ({stored.fingerprint[:12]})")
            out["base_model"] = stored.name
    return out


def local_base(
    registry: Registry,
    value: str,
    *,
    spec_dir: Path = Path("."),
    progress: Callable[[str], Progress | None] = lambda _: None,
) -> BaseModel | None:
    """Register (upload) ``value`` if it names a local base directory rather than a registered
    base; None when it is a registered name (or neither: the caller's validation says so)."""
    if NAME_RE.fullmatch(value):
        try:
            registry.base(value)
            return None
        except NotFound:
            pass
    path = _local_path(value, spec_dir)
    if path is None or not path.is_dir():
        return None
    name = base_name_for(path)
    return registry.register_base(name=name, path=path, progress=progress(name))
