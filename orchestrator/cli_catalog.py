"""``lorafleet db|base register|adapters|gc``: the catalog and object store from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from orchestrator.cli_common import OUTPUT, Format, console, emit, fmt_bytes, user_errors
from orchestrator.objects import adapter_object

db_app = typer.Typer(no_args_is_help=True, help="Catalog database schema.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter catalog.")


def _registry():  # type: ignore[no-untyped-def]
    from storage.registry import Registry

    return Registry.from_settings()


@db_app.command("upgrade")
@user_errors
def db_upgrade() -> None:
    """Apply pending catalog migrations."""
    from storage.catalog.db import Catalog
    from storage.settings import load_settings

    catalog = Catalog(load_settings().catalog_url)
    before = catalog.current_revision()
    after = catalog.upgrade()
    console.print(f"catalog schema: {before or 'empty'} → {after}")


@db_app.command("status")
@user_errors
def db_status() -> None:
    """Show the catalog schema revision and whether it is current."""
    from storage.catalog.db import Catalog
    from storage.settings import load_settings

    catalog = Catalog(load_settings().catalog_url)
    current, head = catalog.current_revision(), catalog.head_revision()
    state = "up to date" if current == head else "behind: run `lorafleet db upgrade`"
    console.print(f"catalog schema {current or 'empty'} (code needs {head}): {state}")


def register_base(
    name: str = typer.Argument(..., help="Name to register the base under."),
    path: Path = typer.Argument(..., help="Local Hugging Face model directory."),
) -> None:
    """Upload a base model directory to the object store and register it in the catalog.

    Nodes download it from there into their own verified cache; the same bytes registered
    again upload nothing.
    """
    from orchestrator.cli_common import upload_progress

    with upload_progress() as progress:
        base = _registry().register_base(name=name, path=path, progress=progress(name))
    console.print(
        f"base [bold]{base.name}[/]: {base.architecture}, {base.parameter_count:,} parameters, "
        f"{len(base.files)} files ({fmt_bytes(base.total_bytes)}) in the object store, "
        f"fingerprint {base.fingerprint[:16]}…"
    )


@adapters_app.command("import")
@user_errors
def adapters_import(
    directory: Path = typer.Argument(..., help="A PEFT adapter directory."),
    name: str = typer.Option(..., help="namespace/name to publish under."),
    base: str = typer.Option(..., help="Registered base model name."),
    tag: list[str] = typer.Option([], help="Tags (repeatable)."),
) -> None:
    """Check a PEFT adapter against its base and publish it as a new version."""
    v = _registry().import_adapter(adapter_dir=directory, ref=name, base_model=base, tags=tag)
    console.print(f"imported [bold]{v.ref}[/] ({fmt_bytes(v.total_bytes)}, {len(v.files)} files)")


@adapters_app.command("list")
@user_errors
def adapters_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    base: str | None = typer.Option(None, help="Only adapters of this base model."),
    tag: str | None = typer.Option(None, help="Only adapters with this tag."),
    metric: list[str] = typer.Option([], help="Metric filter, e.g. eval_loss<0.5 (repeatable)."),
    deleted: bool = typer.Option(False, help="Include deleted versions."),
    output: Format = OUTPUT,
) -> None:
    """List adapter versions."""
    from storage.metric_filter import parse_metric_filter

    filters = [parse_metric_filter(m) for m in metric]
    versions = _registry().list(
        namespace=namespace, base_model=base, tag=tag, include_deleted=deleted
    )
    versions = [v for v in versions if all(f.matches(v.metrics) for f in filters)]
    if emit([adapter_object(v) for v in versions], output):
        return
    table = Table("adapter", "state", "base", "r", "targets", "size", "aliases", "tags", "created")
    for v in versions:
        targets = (
            v.target_modules if isinstance(v.target_modules, str) else ",".join(v.target_modules)
        )
        table.add_row(
            v.ref,
            v.state,
            v.base_model.name,
            str(v.r),
            targets,
            fmt_bytes(v.total_bytes),
            ",".join(v.aliases),
            ",".join(v.tags),
            v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
        )
    console.print(table)
    console.print(f"{len(versions)} version(s)")


@adapters_app.command("show")
@user_errors
def adapters_show(
    ref: str = typer.Argument(..., help="ns/name, ns/name:VERSION or ns/name@ALIAS"),
    output: Format = OUTPUT,
) -> None:
    """Show one version with its lineage."""
    v = _registry().resolve(ref)
    if emit(adapter_object(v), output):
        return
    table = Table(title=v.ref, show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [
        ("state", v.state),
        (
            "base model",
            f"{v.base_model.name} ({v.base_model.architecture}, fingerprint "
            f"{v.base_model.fingerprint[:16]}…)",
        ),
        ("job", v.job_id or "-"),
        ("dataset sha256", v.dataset_sha256 or "-"),
        ("LoRA", f"r={v.r} alpha={v.alpha:g} rslora={v.use_rslora} targets={v.target_modules}"),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("tags", ", ".join(v.tags) or "-"),
        ("created", f"{v.created_at} by {v.created_by or '-'}"),
        ("object prefix", v.object_prefix),
        ("size", fmt_bytes(v.total_bytes)),
        ("digest", v.digest),
    ]
    rows += [(f"file {f.name}", f"{f.size:,} B sha256 {f.sha256}") for f in v.files]
    rows += [("metrics", json.dumps(v.metrics, sort_keys=True)[:400] or "-")]
    for k, val in rows:
        table.add_row(k, str(val))
    console.print(table)


@adapters_app.command("promote")
@user_errors
def adapters_promote(
    ref: str = typer.Argument(..., help="The version to point at (ns/name:VERSION)."),
    alias: str = typer.Argument(..., help="Alias, e.g. production or canary."),
) -> None:
    """Point an alias at a version (atomically)."""
    v = _registry().promote(ref, alias)
    console.print(f"{v.namespace}/{v.name}@{alias} → version {v.version}")


@adapters_app.command("delete")
@user_errors
def adapters_delete(ref: str = typer.Argument(..., help="ns/name:VERSION")) -> None:
    """Mark a version deleted (its bytes go at the next `lorafleet gc`)."""
    v = _registry().delete(ref)
    console.print(f"deleted {v.ref}")


@adapters_app.command("download")
@user_errors
def adapters_download(
    ref: str = typer.Argument(..., help="ns/name, ns/name:VERSION or ns/name@ALIAS"),
    out: Path = typer.Option(..., help="Directory to write the adapter files to."),
) -> None:
    """Fetch a version (verified) and copy it to a directory."""
    import shutil

    v, cached = _registry().fetch(ref)
    out.mkdir(parents=True, exist_ok=True)
    for f in v.files:
        shutil.copyfile(cached / f.name, out / f.name)
    console.print(f"{v.ref} → {out} ({len(v.files)} files, digests verified)")


def gc(
    dry_run: bool = typer.Option(False, help="Only list what would be removed."),
    min_age_s: float = typer.Option(3600.0, help="Keep objects younger than this (in flight)."),
) -> None:
    """Remove objects that no live adapter version references."""
    report = _registry().gc(dry_run=dry_run, min_age_s=min_age_s)
    verb = "would remove" if dry_run else "removed"
    for key in report.orphan_keys:
        console.print(f"{verb} {key}", highlight=False)
    console.print(f"{verb} {len(report.orphan_keys)} object(s)")
