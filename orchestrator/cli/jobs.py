"""``lorafleet submit|jobs|server``: the control plane from the shell."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, err_console, user_errors

jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")


def _settings():  # type: ignore[no-untyped-def]
    from storage.settings import load_settings

    return load_settings()


def _registry(settings: Any):  # type: ignore[no-untyped-def]
    from storage.registry import Registry

    return Registry.from_settings(settings)


def _total_steps(job: Any) -> int | None:
    return (job.spec.get("training") or {}).get("max_steps")


def follow(catalog: Any, job_id: str, *, total: int | None) -> str:
    """Show a job's progress until it ends; returns the final state."""
    from orchestrator.lifecycle import TERMINAL
    from storage.catalog import jobs

    last, state, adapter = 0, "queued", None
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    task = progress.add_task(job_id, total=total, loss="-", tps="-")
    with progress:
        while True:
            for e in jobs.list_events(catalog, job_id=job_id, after_id=last):
                last = e.id
                if e.kind == "metrics":
                    progress.update(
                        task,
                        completed=e.data.get("step", 0),
                        loss=f"{e.data.get('loss', 0):.4f}",
                        tps=f"{e.data.get('tokens_per_s', 0):,.0f}",
                    )
                elif e.kind == "state":
                    state = e.data["state"]
                    msg = f"{job_id}: {state}"
                    if e.data.get("error"):
                        msg += f" — {e.data['error']}"
                    progress.console.print(msg, highlight=False)
                elif e.kind == "adapter":
                    adapter = e.data.get("ref")
                elif e.kind == "resumed":
                    progress.console.print(f"resumed from step {e.data.get('from_step')}")
            if state in TERMINAL:
                break
            time.sleep(0.5)
    if adapter:
        console.print(f"adapter [bold]{adapter}[/]")
    return state


@user_errors
def submit(
    spec_files: list[Path] = typer.Argument(..., help="Job specs (YAML or JSON)."),
    follow_: bool = typer.Option(False, "--follow", help="Show live progress until they end."),
) -> None:
    """Submit fine-tune jobs. Embedded (no LORAFLEET_RAY_ADDRESS): runs them here, followed.

    Several specs are all validated and uploaded first, then queued together, so that jobs
    on the same base are admitted in one scheduling tick and train as one pack.

    Local paths in the spec (``training_data``, ``validation_data``, a ``base_model``
    directory) are uploaded first — identical content only once — and replaced by ids.
    """
    import ray

    from orchestrator.cli.common import upload_progress, warn
    from orchestrator.scheduler import (
        SchedulerCore,
        SchedulerLoop,
        ray_hooks,
        start_scheduler_actor,
    )
    from orchestrator.service import submit_job
    from orchestrator.spec import deprecated_spellings, parse_spec, read_spec_file
    from orchestrator.uploads import localize_inputs

    settings = _settings()
    registry = _registry(settings)
    specs = []
    for spec_file in spec_files:  # every spec checked and uploaded before any is queued
        with upload_progress() as progress:
            data = localize_inputs(
                read_spec_file(spec_file), registry, spec_dir=spec_file.parent,
                max_bytes=settings.max_upload_bytes, say=console.print, progress=progress,
            )  # fmt: skip
        specs.append(parse_spec(data))
        for message in deprecated_spellings(data):
            warn(message)
    results = [submit_job(registry.catalog, spec) for spec in specs]
    for spec, result in zip(specs, results, strict=True):
        verb = "submitted" if result.created else "already submitted (same idempotency key)"
        console.print(f"{verb}: [bold]{result.job.id}[/] ({spec.namespace}/{spec.name})")
    embedded = settings.ray_address is None
    ray.init(address=settings.ray_address or "local", include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)  # fmt: skip
    loop = None
    try:
        if embedded:
            console.print("embedded mode: the job runs in this process (set LORAFLEET_RAY_ADDRESS "
                          "to submit to a cluster)")  # fmt: skip
            loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.5)
            loop.start()
        else:
            start_scheduler_actor(settings)
        if not (follow_ or embedded):
            return
        # followed one after another (they train together meanwhile)
        states = {r.job.id: follow(registry.catalog, r.job.id, total=_total_steps(r.job))
                  for r in results}  # fmt: skip
    finally:
        if loop is not None:
            loop.stop()
        ray.shutdown()
    failed = {job_id: state for job_id, state in states.items() if state != "succeeded"}
    for job_id, state in failed.items():
        err_console.print(f"[bold red]job {job_id} {state}[/]")
    if failed:
        raise typer.Exit(1)


@jobs_app.command("list")
@user_errors
def jobs_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    state: str | None = typer.Option(None, help="Only jobs in this state."),
    limit: int | None = typer.Option(None, min=1, help="At most this many (default: all)."),
    show_packs: bool = typer.Option(
        False, "--packs", help="List packs (jobs training together) and their slots instead."
    ),
    output: Format = OUTPUT,
) -> None:
    """List jobs, newest first (read from the catalog a page at a time)."""
    from orchestrator.objects import job_object
    from storage.catalog import jobs

    catalog = _registry(_settings()).catalog
    if show_packs:
        _packs_list(catalog, state=state, limit=limit or 100, output=output)
        return
    found = jobs.iter_jobs(catalog, namespace=namespace, states=[state] if state else None)
    rows = list(itertools.islice(found, limit))
    if emit(lambda: [job_object(j) for j in rows], output):
        return
    table = Table("id", "namespace", "name", "state", "priority", "attempts", "created", "reason")
    for j in rows:
        table.add_row(
            j.id,
            j.namespace,
            j.name,
            j.state,
            str(j.priority),
            str(j.attempts),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            j.status_reason or "",
        )
    console.print(table)


def _packs_list(catalog: Any, *, state: str | None, limit: int, output: Format) -> None:
    """Packs, newest first: state, slots used/max, the jobs training in each now."""
    from orchestrator.objects import pack_object
    from storage.catalog import jobs, packs

    if state is not None and state not in ("open", "closed"):
        raise typer.BadParameter("with --packs, --state is open or closed", param_hint="--state")
    found = packs.list_packs(catalog, states=[state] if state else None, limit=limit)
    if emit(lambda: [pack_object(p) for p in found], output):
        return
    table = Table("pack", "state", "slots", "jobs", "created")
    for p in found:
        names = []
        for job_id in p.jobs:
            j = jobs.get_job(catalog, job_id=job_id)
            names.append(f"{j.namespace}/{j.name} ({j.id})")
        table.add_row(p.id, p.state, f"{len(p.jobs)}/{p.max_slots}", "\n".join(names) or "-",
                      p.created_at.strftime("%Y-%m-%d %H:%M:%S"))  # fmt: skip
    console.print(table)


@jobs_app.command("show")
@user_errors
def jobs_show(job_id: str = typer.Argument(...), output: Format = OUTPUT) -> None:
    """Show one job: state, why it waits, error, checkpoint, adapter."""
    from orchestrator.objects import job_object
    from storage.catalog import jobs

    catalog = _registry(_settings()).catalog
    j = jobs.get_job(catalog, job_id=job_id)
    found = jobs.list_events(catalog, job_id=job_id, kinds=["adapter"], limit=1)
    adapter = found[0].data.get("ref") if found else None
    if emit(lambda: job_object(j, adapter), output):
        return
    pack = "-"
    if j.pack_id is not None:
        from storage.catalog import packs

        p = packs.get_pack(catalog, pack_id=j.pack_id)
        pack = f"{p.id} ({len(p.jobs)}/{p.max_slots} slots, {p.state})"
    table = Table(title=j.id, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for k, v in (
        ("namespace/name", f"{j.namespace}/{j.name}"),
        ("state", j.state),
        ("reason", j.status_reason or "-"),
        ("error", j.error or "-"),
        ("priority", str(j.priority)),
        ("attempts", str(j.attempts)),
        ("pack", pack),
        ("checkpoint", j.checkpoint_uri or "-"),
        ("adapter", adapter or "-"),
        ("created", str(j.created_at)),
        ("finished", str(j.finished_at or "-")),
    ):
        table.add_row(k, v)
    console.print(table)


@jobs_app.command("events")
@user_errors
def jobs_events(job_id: str = typer.Argument(...), output: Format = OUTPUT) -> None:
    """Print a job's events (state changes, metrics, adapter)."""
    from orchestrator.objects import event_object
    from storage.catalog import jobs

    events = list(jobs.iter_events(_registry(_settings()).catalog, job_id=job_id))
    if emit(lambda: [event_object(e) for e in events], output):
        return
    for e in events:
        console.print(f"{e.ts:%H:%M:%S} {e.kind:10s} {e.data}", highlight=False)


@jobs_app.command("cancel")
@user_errors
def jobs_cancel(job_id: str = typer.Argument(...)) -> None:
    """Cancel a job (harmless if it is already cancelled)."""
    from orchestrator.service import cancel_job

    job = cancel_job(_registry(_settings()).catalog, job_id=job_id)
    console.print(f"{job.id}: {job.state}")


@user_errors
def server(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port."),
) -> None:
    """Serve the REST API (GET /health is the only route open without a token)."""
    import uvicorn

    from orchestrator.api import create_app
    from storage.auth import admin_token_problem
    from workers.errors import WorkerError

    settings = _settings()
    token = settings.api_token.get_secret_value() if settings.api_token else None
    problem = admin_token_problem(token)
    if problem is not None:
        raise WorkerError(problem)
    if settings.api_token is None:
        err_console.print("warning: LORAFLEET_API_TOKEN is not set: only namespace tokens work")
    console.print(f"lorafleet API on http://{host}:{port}")
    # keep idle connections longer than clients and load balancers do (httpx: 5 s, ALB: 60 s):
    # at equal timeouts the server may close a connection just as a client reuses it
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                timeout_keep_alive=65)  # fmt: skip
