"""``lorafleet files upload|list|show|delete``: datasets as uploaded files (``file-…``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, fmt_bytes, user_errors

files_app = typer.Typer(no_args_is_help=True, help="Uploaded data files (file-…).")


def _registry():  # type: ignore[no-untyped-def]
    from storage.registry import Registry
    from storage.settings import load_settings

    settings = load_settings()
    return Registry.from_settings(settings), settings


@files_app.command("upload")
@user_errors
def files_upload(
    path: Path = typer.Argument(..., help="A JSONL dataset (text, prompt/completion or chat)."),
    namespace: str = typer.Option(..., help="Team that owns the file."),
) -> None:
    """Validate every row, then store the file (identical content is stored once)."""
    from orchestrator.cli.common import upload_progress
    from orchestrator.uploads import upload_dataset

    registry, settings = _registry()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with upload_progress() as progress:
        record, created = upload_dataset(
            registry, path, namespace=namespace, filename=path.name,
            max_bytes=settings.max_upload_bytes, progress=progress(path.name),
        )  # fmt: skip
    verb = "uploaded" if created else "already uploaded"
    console.print(f"{verb} [bold]{record.id}[/] ({record.filename}, {record.rows} rows, "
                  f"{fmt_bytes(record.bytes)}, sha256 {record.sha256[:16]}…)")  # fmt: skip


@files_app.command("list")
@user_errors
def files_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    output: Format = OUTPUT,
) -> None:
    """List uploaded files, newest first."""
    from orchestrator.objects import file_object
    from storage.catalog import files

    registry, _ = _registry()
    listed = files.list_files(registry.catalog, namespace=namespace)
    if emit(lambda: [file_object(f) for f in listed], output):
        return
    table = Table("id", "namespace", "filename", "rows", "bytes", "sha256", "created")
    for f in listed:
        created = f.created_at.strftime("%Y-%m-%d %H:%M:%S") if f.created_at else "-"
        table.add_row(f.id, f.namespace, f.filename, str(f.rows), fmt_bytes(f.bytes),
                      f.sha256[:16], created)  # fmt: skip
    console.print(table)


@files_app.command("show")
@user_errors
def files_show(file_id: str = typer.Argument(...), output: Format = OUTPUT) -> None:
    """Show one file's record."""
    from orchestrator.objects import file_object
    from storage.catalog import files

    registry, _ = _registry()
    f = files.get_file(registry.catalog, file_id=file_id)
    if emit(lambda: file_object(f), output):
        return
    table = Table(title=f.id, show_header=False)
    for k, v in (("namespace", f.namespace), ("filename", f.filename), ("purpose", f.purpose),
                 ("rows", str(f.rows)), ("bytes", f"{f.bytes:,}"), ("sha256", f.sha256),
                 ("created", str(f.created_at))):  # fmt: skip
        table.add_row(k, v)
    console.print(table)


@files_app.command("delete")
@user_errors
def files_delete(file_id: str = typer.Argument(...)) -> None:
    """Delete a file (its bytes go when no other file has the same content)."""
    registry, _ = _registry()
    f = registry.delete_file(file_id)
    console.print(f"deleted {f.id} ({f.filename})")
