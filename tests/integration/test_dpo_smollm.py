"""DPO on SmolLM2 through ``lorafleet train``, as a user runs it: a cold start learns a held-out
preference (implied-reward accuracy ≥ 0.9 against the adapter-off reference), a warm start
from that adapter begins at ln 2 (its reference is the starting adapter, frozen), the old
``--method dora`` spelling still works with a warning, and a bad row is one line naming
file:line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _rows(numbers: range) -> list[dict[str, Any]]:
    return [{
        "input": {"messages": [{"role": "user", "content": f"What is {a} plus {a + 3}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"{a} + {a + 3} = {2 * a + 3}."}],
        "non_preferred_output": [{"role": "assistant",
                                  "content": "Sorry, I cannot help with arithmetic today."}],
    } for a in numbers]  # fmt: skip


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(base: Path, data: Path, out: Path, *extra: str, home: Path) -> Any:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", "--base", str(base), "--data",
         str(data), "--out", str(out), "--seq-len", "64", *extra],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("prefs")
    return _write(d / "train.jsonl", _rows(range(1, 33))), _write(
        d / "heldout.jsonl", _rows(range(50, 66))
    )


def test_dpo_on_smollm_learns_a_held_out_preference_then_warm_starts(smollm_dir, prefs, tmp_path):
    train, heldout = prefs
    out = tmp_path / "dpo"
    proc = _train(smollm_dir, train, out, "--method", "dpo", "--beta", "0.1", "--eval-data",
                  str(heldout), "--max-steps", "16", "--batch-size", "8", "--lr", "2e-3",
                  "--r", "8", "--targets", "q_proj,v_proj", home=tmp_path / "home")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dpo"
    first, last = metrics["curve"][0], metrics["curve"][-1]
    assert math.isclose(first["loss"], math.log(2), abs_tol=1e-5)  # reference = adapter off
    assert last["eval_rewards/accuracies"] >= 0.9, last
    assert last["eval_rewards/margins"] > 0
    assert metrics["eval_loss_final"] < metrics["eval_loss_initial"]

    # warm start: DPO after DPO (or SFT) — the reference is the starting adapter, frozen
    warm = tmp_path / "warm"
    proc = _train(smollm_dir, train, warm, "--method", "dpo", "--init-adapter", str(out),
                  "--max-steps", "2", "--batch-size", "8", home=tmp_path / "home")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((warm / "metrics.json").read_text())
    assert math.isclose(again["curve"][0]["loss"], math.log(2), abs_tol=1e-5)
    assert again["init_adapter"] == str(out)


def test_old_variant_spelling_warns_and_bad_rows_name_file_and_line(tiny_base_dir, tmp_path):
    from workers.demo_task import TRAIN_FILE

    proc = _train(tiny_base_dir, TRAIN_FILE, tmp_path / "dora", "--method", "dora",
                  "--max-steps", "2", "--batch-size", "4", home=tmp_path / "home")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--method dora is now --variant dora" in proc.stderr
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"]

    rows = _rows(range(3))
    del rows[1]["non_preferred_output"]
    bad = _write(tmp_path / "bad.jsonl", rows)
    proc = _train(tiny_base_dir, bad, tmp_path / "x", "--method", "dpo", home=tmp_path / "home")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.jsonl:2" in lines[0] and "non_preferred_output" in lines[0]
    assert "Traceback" not in proc.stderr
