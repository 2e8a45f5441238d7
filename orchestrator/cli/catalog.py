"""``lorafleet db|base register|adapters|gc``: the catalog and object store from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, fmt_bytes, user_errors

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
    from orchestrator.cli.common import upload_progress

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
    from orchestrator.spectra import spectrum_metrics, spectrum_of_dir

    spectrum = spectrum_of_dir(directory)
    metrics = spectrum_metrics(spectrum)
    v = _registry().import_adapter(adapter_dir=directory, ref=name, base_model=base, tags=tag,
                                   metrics=metrics, spectrum=spectrum)  # fmt: skip
    console.print(f"imported [bold]{v.ref}[/] ({fmt_bytes(v.total_bytes)}, {len(v.files)} files)")


@adapters_app.command("list")
@user_errors
def adapters_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    base: str | None = typer.Option(None, help="Only adapters of this base model."),
    tag: str | None = typer.Option(None, help="Only adapters with this tag."),
    metric: list[str] = typer.Option([], help="Metric filter, e.g. eval_loss<0.5 (repeatable)."),
    deleted: bool = typer.Option(False, help="Include deleted versions."),
    idle: str | None = typer.Option(
        None, help="Only versions with no traffic for this long, e.g. 30d (least used first)."
    ),
    output: Format = OUTPUT,
) -> None:
    """List adapter versions."""
    from orchestrator.objects import adapter_object
    from storage.metric_filter import parse_metric_filter

    filters = [parse_metric_filter(m) for m in metric]
    if idle is not None:
        _idle_list(namespace, idle, output)
        return
    versions = _registry().list(
        namespace=namespace, base_model=base, tag=tag, include_deleted=deleted
    )
    versions = [v for v in versions if all(f.matches(v.metrics) for f in filters)]
    if emit(lambda: [adapter_object(v) for v in versions], output):
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


def _idle_list(namespace: str | None, idle: str, output: Format) -> None:
    from orchestrator.durations import parse_duration
    from orchestrator.objects import adapter_object
    from storage.catalog import usage

    try:
        days = parse_duration(idle, "--idle") / 86400
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--idle") from None
    found = usage.idle_versions(_registry().catalog, days=days, namespace=namespace)
    body = [{**adapter_object(v), "last_used_at": int(u.timestamp()) if u else None}
            for v, u in found]  # fmt: skip
    if emit(body, output):
        return
    table = Table("adapter", "aliases", "size", "created", "last used")
    for v, used in found:
        table.add_row(v.ref, ",".join(v.aliases) or "-", fmt_bytes(v.total_bytes),
                      v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
                      used.strftime("%Y-%m-%d %H:%M") if used else "never")  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} version(s) with no traffic for {idle}")


@adapters_app.command("show")
@user_errors
def adapters_show(
    ref: str = typer.Argument(..., help="ns/name, ns/name:VERSION or ns/name@ALIAS"),
    output: Format = OUTPUT,
) -> None:
    """Show one version with its lineage."""
    from orchestrator.objects import adapter_object

    v = _registry().resolve(ref)
    if emit(lambda: adapter_object(v), output):
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
        (
            "method",
            f"{v.method}: r={v.r} alpha={v.alpha:g} rslora={v.use_rslora} "
            f"targets={v.target_modules}",
        ),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("tags", ", ".join(v.tags) or "-"),
        ("created", f"{v.created_at} by {v.created_by or '-'}"),
        ("object prefix", v.object_prefix),
        ("size", fmt_bytes(v.total_bytes)),
        ("digest", v.digest),
    ]
    rows += [(f"file {f.name}", f"{f.size:,} B sha256 {f.sha256}") for f in v.files]
    rows += [("metrics", json.dumps(v.metrics, sort_keys=True)[:400] or "-")]
    from storage.catalog import promotion

    gates = promotion.gates(_registry().catalog, namespace=v.namespace, name=v.name)
    rows += [(f"gate @{alias}", " and ".join(rules)) for alias, rules in gates.items()]
    if not gates:
        rows.append(("gates", "-"))
    for k, val in rows:
        table.add_row(k, str(val))
    console.print(table)


@adapters_app.command("promote")
@user_errors
def adapters_promote(
    ref: str = typer.Argument(..., help="The version to point at (ns/name:VERSION)."),
    alias: str = typer.Argument(..., help="Alias, e.g. production or canary."),
    force: bool = typer.Option(False, help="Pass a failing gate (recorded as an event)."),
) -> None:
    """Point an alias at a version (atomically), through the alias's gate."""
    v = _registry().promote(ref, alias, force=force, actor="cli")
    console.print(f"{v.namespace}/{v.name}@{alias} → version {v.version}")


@adapters_app.command("rollback")
@user_errors
def adapters_rollback(
    name: str = typer.Argument(..., help="ns/name"),
    alias: str = typer.Argument(..., help="The alias to move back, e.g. production."),
    force: bool = typer.Option(False, help="Pass a failing gate (recorded as an event)."),
) -> None:
    """Point an alias back at the version it pointed at before its last move."""
    from storage.catalog import promotion

    ns, repo_name = _repo_name(name)
    v, _ = promotion.rollback(_registry().catalog, namespace=ns, name=repo_name, alias=alias,
                              force=force, actor="cli")  # fmt: skip
    console.print(f"{ns}/{repo_name}@{alias} → version {v.version}")


def _repo_name(text: str) -> tuple[str, str]:
    from storage.names import parse_ref

    ref = parse_ref(text)
    if ref.version is not None or ref.alias is not None:
        raise typer.BadParameter(f"{text!r}: name the adapter (ns/name), not a version")
    return ref.namespace, ref.name


@adapters_app.command("gate")
@user_errors
def adapters_gate(
    name: str = typer.Argument(..., help="ns/name"),
    alias: str = typer.Argument(..., help="The gated alias, e.g. production."),
    require: list[str] = typer.Option(
        [], help="A rule every promotion must pass (repeatable): eval_loss<=0.5, or "
        "eval_loss<=current+2% (not worse than the version it replaces by more than 2 %)."),
    clear: bool = typer.Option(False, help="Remove the alias's gate."),
) -> None:  # fmt: skip
    """Set (replace) or clear the gate a version must pass to take an alias."""
    from storage.catalog import promotion

    if clear == bool(require):
        raise typer.BadParameter("give --require rules, or --clear (one of the two)")
    ns, repo_name = _repo_name(name)
    rules = promotion.set_gate(_registry().catalog, namespace=ns, name=repo_name, alias=alias,
                               rules=require, actor="cli")  # fmt: skip
    shown = " and ".join(rules) if rules else "none (cleared)"
    console.print(f"gate of {ns}/{repo_name}@{alias}: {shown}")


@adapters_app.command("inspect")
@user_errors
def adapters_inspect(
    ref: str = typer.Argument(..., help="ns/name, ns/name:VERSION or ns/name@ALIAS"),
    output: Format = OUTPUT,
) -> None:
    """Per adapted layer: the singular values of scaling·B·A and the ranks that keep 90 % and
    99 % of its energy (most adapters use far fewer directions than their rank)."""
    from orchestrator.objects import spectrum_object
    from orchestrator.spectra import version_spectrum

    registry = _registry()
    v = registry.resolve(ref)
    spectrum = version_spectrum(registry, v)
    if emit(lambda: spectrum_object(v, spectrum), output):
        return
    table = Table("layer", "r", "singular values (largest first)", "rank 90 %", "rank 99 %",
                  title=f"spectrum of {v.ref}")  # fmt: skip
    for layer in spectrum["layers"]:
        sigma = layer["singular_values"]
        shown = " ".join(f"{x:.3g}" for x in sigma[:8]) + (" …" if len(sigma) > 8 else "")
        table.add_row(layer["module"], str(layer["r"]), shown, str(layer["rank_90"]),
                      str(layer["rank_99"]))  # fmt: skip
    console.print(table)
    console.print(f"r = {spectrum['r']}: every layer keeps 90 % of its energy at rank "
                  f"{spectrum['rank_90']}, 99 % at rank {spectrum['rank_99']} "
                  f"(`lorafleet adapters compress {v.ref} --energy 0.99`)")  # fmt: skip


@adapters_app.command("compress")
@user_errors
def adapters_compress(
    ref: str = typer.Argument(..., help="The version to compress (ns/name:VERSION, @alias…)."),
    rank: int | None = typer.Option(None, help="The rank K of the new version."),
    energy: float | None = typer.Option(
        None, help="Or: the least rank that keeps this share of every layer's energy (0.99)."
    ),
    name: str | None = typer.Option(None, help="Publish under this ns/name (default: the same)."),
) -> None:
    """Publish the best rank-K approximation of a version (truncated SVD of each layer's B·A)
    as a new version: PEFT-loadable, lineage ``compressed_from``."""
    from orchestrator.spectra import compress_version

    done = compress_version(_registry(), ref, rank=rank, energy=energy, out_ref=name)
    console.print(
        f"[bold]{done.version.ref}[/]: rank {done.rank} (from r = {done.source.r}) of "
        f"{done.source.ref}; every layer keeps ≥ {done.energy_kept_min:.2%} of its energy; "
        f"size {fmt_bytes(done.version.total_bytes)} = {done.size_ratio:.3f}× of "
        f"{fmt_bytes(done.source.total_bytes)}"
    )


@adapters_app.command("delete")
@user_errors
def adapters_delete(
    ref: str = typer.Argument(..., help="ns/name:VERSION"),
    force: bool = typer.Option(False, help="Delete it even if an alias points at it (recorded)."),
) -> None:
    """Mark a version deleted (its bytes go at the next `lorafleet gc`); refused while an
    alias points at it."""
    v = _registry().delete(ref, force=force, actor="cli")
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
