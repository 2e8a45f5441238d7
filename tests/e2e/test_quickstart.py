"""The quickstart as a user runs it: a fresh LORAFLEET_HOME, a subprocess, twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open


def _run(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.quickstart", "--steps", "150"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_quickstart_end_to_end_and_idempotent(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "quickstart passed" in out
    assert "created tiny Llama base" in out
    assert "exact match on 64 held-out prompts: base 0%" in out
    assert "generations identical: True" in out
    root = tmp_path / "quickstart"
    assert (root / "adapter" / "adapter_config.json").is_file()
    with safe_open(root / "merged" / "model.safetensors", "pt") as fh:
        assert not any("lora" in k for k in fh.keys())  # noqa: SIM118

    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing tiny Llama base" in second.stdout
