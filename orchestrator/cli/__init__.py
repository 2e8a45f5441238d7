"""The ``lorafleet`` command line: one clear line on bad input, rich progress for long work."""

from __future__ import annotations

import logging
import os

import typer

from orchestrator.cli.catalog import adapters_app, db_app, gc, register_base
from orchestrator.cli.common import user_errors
from orchestrator.cli.files import files_app
from orchestrator.cli.jobs import jobs_app, server, submit
from orchestrator.cli.local import (
    base_create_tiny,
    generate_cmd,
    lora_report_cmd,
    merge_cmd,
    train_cmd,
)
from orchestrator.cli.namespaces import namespaces_app
from orchestrator.cli.serve import serve
from orchestrator.cli.tokens import tokens_app
from orchestrator.cli.usage import usage

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
base_app = typer.Typer(no_args_is_help=True, help="Base models.")
lora_app = typer.Typer(no_args_is_help=True, help="LoRA arithmetic.")
app.add_typer(base_app, name="base")
app.add_typer(lora_app, name="lora")
app.add_typer(db_app, name="db")
app.add_typer(adapters_app, name="adapters")
app.command("gc")(user_errors(gc))
app.add_typer(jobs_app, name="jobs")
app.add_typer(files_app, name="files")
app.add_typer(namespaces_app, name="namespaces")
app.add_typer(tokens_app, name="tokens")
app.command("submit")(submit)
app.command("server")(server)
app.command("serve")(serve)
app.command("usage")(usage)
base_app.command("register")(user_errors(register_base))
base_app.command("create-tiny")(base_create_tiny)
lora_app.command("report")(lora_report_cmd)
app.command("train")(train_cmd)
app.command("generate")(generate_cmd)
app.command("merge")(merge_cmd)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(
        level=os.environ.get("LORAFLEET_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # (without importing it)
    app()


if __name__ == "__main__":
    main()
