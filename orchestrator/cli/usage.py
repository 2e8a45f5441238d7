"""``lorafleet usage``: requests and tokens served, per adapter version and namespace."""

from __future__ import annotations

from datetime import timedelta

import typer
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, user_errors
from orchestrator.durations import parse_duration


@user_errors
def usage(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    adapter: str | None = typer.Option(
        None, help="ns/name (every version), ns/name:VERSION, or the base's name."
    ),
    since: str = typer.Option("30d", help="How far back: 15m, 12h, 30d."),
    per_minute: bool = typer.Option(False, help="One row per minute instead of totals."),
    output: Format = OUTPUT,
) -> None:
    """Served requests and prompt/completion tokens (the ``usage`` the API returned)."""
    from orchestrator.objects import usage_object
    from storage.catalog import usage as usage_store
    from storage.catalog.models import utcnow
    from storage.registry import Registry

    try:
        start = utcnow() - timedelta(seconds=parse_duration(since, "--since"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    found = usage_store.query_usage(
        Registry.from_settings().catalog, namespace=namespace, adapter=adapter, since=start,
        group="minute" if per_minute else "model",
    )  # fmt: skip
    if emit(lambda: [usage_object(u, per_minute=per_minute) for u in found], output):
        return
    table = Table("minute" if per_minute else "since", "namespace", "model", "requests",
                  "prompt tokens", "completion tokens", "total tokens")  # fmt: skip
    for u in found:
        table.add_row(u.minute.strftime("%Y-%m-%d %H:%M"), u.namespace or "(admin)", u.model,
                      f"{u.requests:,}", f"{u.prompt_tokens:,}", f"{u.completion_tokens:,}",
                      f"{u.total_tokens:,}")  # fmt: skip
    console.print(table)
    total = sum(u.requests for u in found)
    console.print(f"{total:,} request(s), {sum(u.total_tokens for u in found):,} tokens "
                  f"in the last {since}")  # fmt: skip
