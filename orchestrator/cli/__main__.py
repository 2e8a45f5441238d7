"""``python -m orchestrator.cli``: the ``lorafleet`` command."""

from orchestrator.cli import main

main()
