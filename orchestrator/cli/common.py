"""What every ``lorafleet`` command shares: consoles, the user-error guard, progress, units."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from orchestrator.lifecycle import IllegalTransition
from storage.errors import StorageError
from workers.errors import WorkerError

# Piped, rich would fit tables into 80 columns and cut identifiers ("acc/de…"): a console
# that is not a terminal is as wide as the content needs.
console = Console() if sys.stdout.isatty() else Console(width=10_000)
err_console = Console(stderr=True)


def warn(message: str) -> None:
    """One yellow line on stderr: the command goes on."""
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


F = TypeVar("F", bound=Callable[..., Any])


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


OUTPUT = typer.Option(Format.table, "--output", "-o", help="table, or the API's objects as "
                      "json or yaml (for scripts).")  # fmt: skip


def emit(data: Any, fmt: Format) -> bool:
    """Print ``data`` (the API's objects, or a function returning them: built only when
    printed) as JSON or YAML; False for ``table`` (the caller prints its table)."""
    if fmt is Format.table:
        return False
    if callable(data):
        data = data()
    if fmt is Format.json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif fmt is Format.yaml:
        import yaml  # only YAML output pays its import

        typer.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=True))
    return True


def user_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the user can fix this": one line, exit code 1. (Imported when
    an error happens: importing the spec or the LoRA package at start would cost every
    command, ``--help`` too, the start-up of torch and the catalog.)"""
    from orchestrator.spec import SpecError
    from workers.lora.errors import LoraError

    # (UploadTooLarge is a DatasetError, hence a WorkerError: covered.)
    return (WorkerError, LoraError, StorageError, SpecError, IllegalTransition, KeyError,
            FileNotFoundError)  # fmt: skip


def user_errors(fn: F) -> F:
    """Turn a user mistake into one red line on stderr and exit code 1 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, user_error_types()):
                raise
            message = exc.args[0] if type(exc) is KeyError and exc.args else str(exc)
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def quiet_hf() -> None:
    """transformers without its progress bars and warnings (the CLI shows its own progress);
    called by the commands that load models, so that the others never import it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def fmt_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:.1f} TiB"


class train_progress:
    """A rich progress bar fed by ``StepReport`` callbacks; starts at the first step."""

    def __init__(self, total: int, description: str = "training") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, loss="-", tps="-")
        self.started = False

    def __enter__(self) -> Callable[[Any], None]:
        def on_report(report: Any) -> None:
            if not self.started:  # start on the first step, after loading has succeeded
                self.progress.start()
                self.started = True
            self.progress.update(
                self.task,
                completed=report.step,
                loss=f"{report.loss:.4f}",
                tps=f"{report.tokens_per_s:,.0f}",
            )

        return on_report

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()


class upload_progress:
    """Byte progress bars for uploads: ``progress(label)`` returns a ``(done, total)`` callback.

    A bar appears only once a transfer starts, so nothing is drawn when everything is already
    stored.
    """

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]uploading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.started = False

    def __enter__(self) -> Callable[[str], Callable[[int, int], None]]:
        def for_label(label: str) -> Callable[[int, int], None]:
            task: list[Any] = []

            def on_bytes(done: int, total: int) -> None:
                if not self.started:
                    self.progress.start()
                    self.started = True
                if not task:
                    task.append(self.progress.add_task(label, total=total))
                self.progress.update(task[0], completed=done, total=total)

            return on_bytes

        return for_label

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()
