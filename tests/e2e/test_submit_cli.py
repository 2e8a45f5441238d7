"""``lorafleet submit --follow`` end to end on embedded defaults, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from workers.demo_task import HELDOUT_FILE, TRAIN_FILE


def _cli(args, home, timeout=300):  # type: ignore[no-untyped-def]
    env = {**os.environ, "LORAFLEET_HOME": str(home), "COLUMNS": "200"}
    env.pop("LORAFLEET_RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _spec(tmp_path, tiny_base_dir, data=TRAIN_FILE, **extra):  # type: ignore[no-untyped-def]
    spec = {"name": "digits", "namespace": "demo", "base_model": str(tiny_base_dir),
            "training_data": str(data), "validation_data": str(HELDOUT_FILE),
            "output_adapter": "demo/digits",
            "training": {"max_steps": 20, "batch_size": 8, "seq_len": 64, "eval_every": 10},
            "resources": {"workers_per_node": 2}, **extra}  # fmt: skip
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_follow_publishes_the_adapter(tmp_path, tiny_base_dir):
    home = tmp_path / "home"
    r = _cli(["submit", _spec(tmp_path, tiny_base_dir), "--follow"], home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout and "adapter demo/digits:1" in r.stdout
    # the local inputs were uploaded and the job names them by id
    assert "training_data: uploaded demo_train.jsonl as file-" in r.stdout
    assert f"base_model: {tiny_base_dir} registered as" in r.stdout
    again = _cli(["files", "upload", TRAIN_FILE, "--namespace", "demo"], home, timeout=60)
    assert again.returncode == 0 and "already uploaded" in again.stdout  # stored once
    listed = _cli(["files", "list", "--namespace", "demo"], home, timeout=60)
    assert "demo_train.jsonl" in listed.stdout and "demo_heldout.jsonl" in listed.stdout
    listed = _cli(["jobs", "list"], home)
    assert "succeeded" in listed.stdout
    shown = _cli(["adapters", "show", "demo/digits"], home)
    assert shown.returncode == 0 and "ftjob-" in shown.stdout


def test_bad_spec_and_failing_job_exit_non_zero(tmp_path, tiny_base_dir):
    home = tmp_path / "home"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "namespace": "demo", "trainig": {}}))
    r = _cli(["submit", bad], home, timeout=60)
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": 1}\n')
    # a bad row is refused at upload, naming the line: no job is created
    r = _cli(["submit", _spec(tmp_path, tiny_base_dir, data=broken), "--follow"], home)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "broken.jsonl:1" in r.stderr and "Traceback" not in r.stderr
    missing = _spec(tmp_path, tiny_base_dir, data=tmp_path / "nope.jsonl")
    r = _cli(["submit", missing], home, timeout=60)
    assert r.returncode == 1 and "training_data" in r.stderr and "Traceback" not in r.stderr
    # a run that fails on the cluster still exits non-zero with its reason
    r = _cli(["submit", _spec(tmp_path, tiny_base_dir, training={"max_steps": 2, "seq_len": 2}),
              "--follow"], home)  # fmt: skip
    assert r.returncode == 1 and "failed" in r.stdout + r.stderr and "seq_len=2" in r.stdout


def test_specs_submitted_in_one_command_train_as_one_pack(tmp_path, tiny_base_dir):
    """``submit a.yaml b.yaml``: both queued before the scheduler's first look, admitted in
    one tick, one pack — the way to submit jobs together (separate submits seconds apart each
    start alone: a lone job does not wait for company)."""
    home = tmp_path / "home"
    one = {"resources": {"workers_per_node": 1}}
    a = _spec(tmp_path, tiny_base_dir, name="first", output_adapter="demo/first", **one)
    b = _spec(tmp_path, tiny_base_dir, name="second", output_adapter="demo/second", **one)
    r = _cli(["submit", a, b, "--follow"], home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("submitted: ftjob-") == 2
    assert "adapter demo/first:1" in r.stdout and "adapter demo/second:1" in r.stdout
    import json

    shown = _cli(["jobs", "list", "--packs", "-o", "json"], home)
    assert len(json.loads(shown.stdout)) == 1, shown.stdout  # one pack held both
    for name in ("first", "second"):
        version = json.loads(_cli(["adapters", "show", f"demo/{name}", "-o", "json"],
                                  home).stdout)  # fmt: skip
        assert version["metrics"]["pack"]["jobs"] == 2, version["metrics"]
