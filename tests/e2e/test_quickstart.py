"""The quickstart as a user runs it: a fresh LORAFLEET_HOME, a subprocess.

Each stage's result is checked from the outside: the job in the catalog, the published
version and its digests, the served answers against the ``lorafleet generate`` CLI, and that
no Ray or server process outlives the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from infra.servers import processes_with_env
from storage.catalog import jobs
from storage.registry import Registry
from storage.settings import load_settings

STEPS = "150"


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "COLUMNS": "120"}
    for key in ("LORAFLEET_RAY_ADDRESS", "LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE"):
        env.pop(key, None)
    return env


def _run(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.quickstart", "--steps", STEPS, "--port", "0"],
        env=_env(home), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_quickstart_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _run(home)
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    assert "quickstart passed" in out and "created tiny Llama base" in out
    assert processes_with_env(f"LORAFLEET_HOME={home}") == []

    result = json.loads((home / "quickstart" / "result.json").read_text())
    assert result["job_state"] == "succeeded" and result["adapter"] == "demo/digits:1"
    assert result["adapter_exact_match"] > result["base_exact_match"]
    assert result["served_equals_local"] is True
    # the console ran alongside: its URL printed, the page and the job readable with the token
    # kept in a private file (never printed)
    assert result["console_ok"] is True and f"console: {result['console_url']}/" in out
    token_file = home / "quickstart" / "console-token"
    assert token_file.stat().st_mode & 0o077 == 0
    assert token_file.read_text().strip() not in out + first.stderr

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(home)}))
    job = jobs.get_job(registry.catalog, job_id=result["job_id"])
    assert job.state == "succeeded" and job.spec["resources"]["workers_per_node"] == 2
    version = registry.resolve("demo/digits:1")
    assert version.state == "ready" and version.job_id == job.id
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in version.files)
    # the served answers equal the local `lorafleet generate` for that adapter (registered
    # base and catalog reference: both through this machine's verified cache)
    prompts = result["prompts"][:4]
    args = ["generate", "--base", "tiny", "--adapter", "demo/digits:1",
            "--max-new-tokens", "8"]  # fmt: skip
    for p in prompts:
        args += ["--prompt", p]
    gen = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=_env(home),
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    served = [a.strip() for a in result["adapter_answers"][:4]]
    assert [line.strip() for line in gen.stdout.splitlines()] == served
    registry.catalog.dispose()


def test_quickstart_set_up_is_idempotent(tmp_path: Path) -> None:
    """A second run reuses the base and its registration (the full second run is ~2 min)."""
    from orchestrator.quickstart import BASE_NAME, _ensure_tiny_base

    base_dir = tmp_path / "tiny-base"
    assert _ensure_tiny_base(base_dir) is True
    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "h")}))
    first = registry.register_base(name=BASE_NAME, path=base_dir)
    assert _ensure_tiny_base(base_dir) is False
    assert registry.register_base(name=BASE_NAME, path=base_dir) == first
    registry.catalog.dispose()
