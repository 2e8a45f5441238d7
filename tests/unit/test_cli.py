"""User mistakes get one clear line and a non-zero exit, never a stack trace."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from workers.demo_task import TRAIN_FILE

runner = CliRunner()


def _invoke(args):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output  # stdout and stderr, interleaved


@pytest.fixture()
def other_shape_adapter(tmp_path):  # type: ignore[no-untyped-def]
    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, save_adapter
    from workers.tiny_base import TinySpec, create_tiny_base

    other = create_tiny_base(tmp_path / "other", TinySpec(hidden=64))
    model, _ = load_base(other)
    inject_lora(model, LoraConfig(r=4))
    return save_adapter(model, LoraConfig(r=4), tmp_path / "other-ad")


def test_bad_inputs(tiny_base_dir, tmp_path, other_shape_adapter):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + '{"prompt": "x"\n')
    train = ["train", "--out", tmp_path / "out", "--max-steps", 1]
    cases = [
        (
            [
                "train",
                "--base",
                tmp_path / "missing",
                "--data",
                TRAIN_FILE,
                "--out",
                tmp_path / "o",
            ],
            "does not exist",
        ),
        ([*train, "--base", tiny_base_dir, "--data", bad], "bad.jsonl:2: malformed JSON"),
        (
            [*train, "--base", tiny_base_dir, "--data", TRAIN_FILE, "--r", 0],
            "lora.r: Input should be greater than or equal to 1",
        ),
        (
            [*train, "--base", tiny_base_dir, "--data", TRAIN_FILE, "--targets", "qkv"],
            "linear modules in this model: down_proj",
        ),
        (
            [
                "generate",
                "--base",
                tiny_base_dir,
                "--adapter",
                other_shape_adapter,
                "--prompt",
                "x",
            ],
            "another base shape",
        ),
        (["lora", "report", "--preset", "llama-99b"], "unknown preset"),
    ]
    for args, message in cases:
        code, output = _invoke(args)
        assert code != 0, args
        assert message in output, output
        assert "Traceback" not in output
        assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1


def test_lora_report_preset_prints_textbook_numbers():
    code, output = _invoke(
        ["lora", "report", "--preset", "llama-7b", "--r", 8, "--targets", "q_proj,v_proj"]
    )
    assert code == 0, output
    for expected in ("4,194,304", "65,536", "256× fewer", "8.0 MiB"):
        assert expected in output


def test_train_then_generate(tiny_base_dir, tmp_path):
    code, output = _invoke(
        [
            "train",
            "--base",
            tiny_base_dir,
            "--data",
            TRAIN_FILE,
            "--out",
            tmp_path / "ad",
            "--max-steps",
            3,
            "--batch-size",
            4,
        ]
    )
    assert code == 0, output
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    outs = []
    for extra in ([], ["--merged"]):
        code, output = _invoke(
            [
                "generate",
                "--base",
                tiny_base_dir,
                "--adapter",
                tmp_path / "ad",
                "--prompt",
                "spell 1 2 =",
                "--max-new-tokens",
                4,
                *extra,
            ]
        )
        assert code == 0, output
        outs.append(output)
    assert outs[0] == outs[1]


def test_the_cli_starts_without_torch_transformers_ray_or_boto3() -> None:
    """Commands that only talk to the catalog or the API import none of the heavy libraries
    (``--help`` took 11 s when ``import orchestrator.cli`` imported torch)."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.cli, orchestrator.cli.catalog, orchestrator.cli.jobs; "
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'boto3', 'alembic') "
            "if m in sys.modules]; assert not heavy, heavy")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
