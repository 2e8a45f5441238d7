"""``lorafleet namespaces list|limits``: the teams and the limits an admin sets on them."""

from __future__ import annotations

import typer
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, user_errors

namespaces_app = typer.Typer(no_args_is_help=True, help="Teams (namespaces) and their limits.")


def _catalog():  # type: ignore[no-untyped-def]
    from storage.registry import Registry

    return Registry.from_settings().catalog


def _limit(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@namespaces_app.command("list")
@user_errors
def namespaces_list(output: Format = OUTPUT) -> None:
    """Every namespace with its limits ("-": none)."""
    from dataclasses import asdict

    from storage.catalog import repository as repo

    listed = repo.list_namespaces(_catalog())
    if emit([{k: v for k, v in asdict(n).items() if k != "id"} for n in listed], output):
        return
    table = Table("namespace", "max jobs", "max CPUs", "max GPUs", "max priority")
    for n in listed:
        table.add_row(n.name, _limit(n.max_concurrent_jobs), _limit(n.max_cpus),
                      _limit(n.max_gpus), str(n.max_priority))  # fmt: skip
    console.print(table)


@namespaces_app.command("limits")
@user_errors
def namespaces_limits(
    namespace: str = typer.Argument(..., help="The team."),
    max_jobs: int | None = typer.Option(None, min=1, help="Concurrent jobs at most."),
    max_cpus: float | None = typer.Option(None, min=0, help="CPUs in use at most."),
    max_gpus: float | None = typer.Option(None, min=0, help="GPUs in use at most."),
    max_priority: int = typer.Option(
        0,
        min=-100,
        max=100,
        help="Highest job priority its members may ask for (default 0: every team equal).",
    ),
) -> None:
    """Set a namespace's limits (an omitted limit is lifted)."""
    from storage.catalog import repository as repo

    n = repo.set_namespace_limits(
        _catalog(), namespace=namespace, max_concurrent_jobs=max_jobs, max_cpus=max_cpus,
        max_gpus=max_gpus, max_priority=max_priority,
    )  # fmt: skip
    console.print(f"namespace [bold]{n.name}[/]: max jobs {_limit(n.max_concurrent_jobs)}, "
                  f"CPUs {_limit(n.max_cpus)}, GPUs {_limit(n.max_gpus)}, max priority "
                  f"{n.max_priority}")  # fmt: skip
