"""``lorafleet train --workers 2`` as a user runs it: its own local Ray, then a clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from workers.demo_task import HELDOUT_FILE, TRAIN_FILE


def test_distributed_train_from_the_cli(tiny_base_dir, tmp_path):
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "train",
            "--base",
            str(tiny_base_dir),
            "--data",
            str(TRAIN_FILE),
            "--eval-data",
            str(HELDOUT_FILE),
            "--out",
            str(out),
            "--max-steps",
            "20",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--workers",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers on 1 node(s)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["eval_loss_final"] < metrics["eval_loss_initial"]
    assert Path(out / "adapter_model.safetensors").is_file()


def test_distributed_train_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "train",
            "--base",
            str(tmp_path / "nope"),
            "--data",
            str(TRAIN_FILE),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
