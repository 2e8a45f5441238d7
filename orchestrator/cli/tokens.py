"""``lorafleet tokens create|list|revoke``: namespace bearer tokens, managed by an operator."""

from __future__ import annotations

import typer
from rich.table import Table

from orchestrator.cli.common import OUTPUT, Format, console, emit, user_errors
from orchestrator.durations import parse_duration

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens of namespaces.")


def _catalog():  # type: ignore[no-untyped-def]
    from storage.registry import Registry

    return Registry.from_settings().catalog


@tokens_app.command("create")
@user_errors
def tokens_create(
    namespace: str = typer.Option(..., help="The team the token acts for."),
    name: str = typer.Option("cli", help="A name to recognise it by in `tokens list`."),
    scope: str = typer.Option("write", help="read (list, download) | write | admin (tokens)."),
    expires_in: str | None = typer.Option(None, help="Lifetime, e.g. 30d or 12h (default: none)."),
) -> None:
    """Create a token; it is printed once and only its SHA-256 is stored."""
    from storage.catalog import repository as repo

    try:
        seconds = parse_duration(expires_in) if expires_in is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    token = repo.create_token(_catalog(), namespace=namespace, name=name, scope=scope,
                              expires_in_s=seconds)  # fmt: skip
    console.print(f"token for [bold]{namespace}[/] ({scope}); shown only now:")
    console.print(token, soft_wrap=True)


@tokens_app.command("list")
@user_errors
def tokens_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    output: Format = OUTPUT,
) -> None:
    """Every token (never its secret), with its scope, expiry and revocation."""
    from orchestrator.objects import token_object
    from storage.catalog import repository as repo

    listed = repo.list_tokens(_catalog(), namespace=namespace)
    if emit(lambda: [token_object(t) for t in listed], output):
        return
    table = Table("id", "namespace", "name", "scope", "created", "expires", "revoked")

    def ts(d) -> str:  # type: ignore[no-untyped-def]
        return d.strftime("%Y-%m-%d %H:%M") if d is not None else "-"

    for t in listed:
        table.add_row(str(t.id), t.namespace, t.name, t.scope, ts(t.created_at),
                      ts(t.expires_at), ts(t.revoked_at))  # fmt: skip
    console.print(table)


@tokens_app.command("revoke")
@user_errors
def tokens_revoke(token_id: int = typer.Argument(..., help="The id from `tokens list`.")) -> None:
    """Revoke a token: requests with it are refused from now on."""
    from storage.catalog import repository as repo

    t = repo.revoke_token(_catalog(), token_id=token_id)
    console.print(f"revoked token {t.id} ({t.namespace}/{t.name})")
