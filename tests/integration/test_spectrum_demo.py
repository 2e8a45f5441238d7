"""Spectrum and rank reduction on the demo task, through the CLI and the API: an r = 16 adapter
compressed to the rank that keeps 99 % of its energy keeps ≥ 95 % of its exact-match score,
loads in PEFT with the logits ours give, and records where it came from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from typer.testing import CliRunner

from orchestrator.api import create_app
from orchestrator.cli import app
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.demo_task import TRAIN_FILE, heldout_exact_match
from workers.lora import LoraConfig, load_adapter
from workers.training.recipe import TrainConfig
from workers.training.single import train_single

runner = CliRunner()


def _ok(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for var in ("LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE", "LORAFLEET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def test_an_r16_demo_adapter_compressed_to_99_percent_energy(home, tiny_base_dir, tmp_path):
    trained = train_single(
        base_dir=tiny_base_dir, data_path=TRAIN_FILE, out_dir=tmp_path / "r16",
        lora=LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=300, lr=3e-3, batch_size=16, seq_len=64, eval_every=0,
                          warmup_steps=10),
    )  # fmt: skip
    _ok("base", "register", "tiny", tiny_base_dir)
    _ok("adapters", "import", trained.adapter_dir, "--name", "demo/digits", "--base", "tiny")
    shown = _ok("adapters", "inspect", "demo/digits:1")
    assert "model.layers.0.self_attn.q_proj" in shown and "99 % at rank" in shown
    spectrum = json.loads(_ok("adapters", "inspect", "demo/digits:1", "-o", "json"))
    assert spectrum["r"] == 16 and 1 <= spectrum["rank_90"] <= spectrum["rank_99"] < 16
    for layer in spectrum["layers"]:
        sigma = layer["singular_values"]
        assert len(sigma) == 16 and sigma == sorted(sigma, reverse=True)

    out = " ".join(_ok("adapters", "compress", "demo/digits:1", "--energy", "0.99").split())
    m = re.search(r"demo/digits:2: rank (\d+) \(from r = 16\).* = ([0-9.]+)× of", out)
    assert m is not None, out
    rank, ratio = int(m[1]), float(m[2])
    assert rank == spectrum["rank_99"] and ratio == pytest.approx(rank / 16)

    registry = Registry.from_settings(load_settings())
    v1, d1 = registry.fetch("demo/digits:1")
    v2, d2 = registry.fetch("demo/digits:2")
    assert v2.r == rank and v2.hyperparameters["compressed_from"] == "demo/digits:1"
    assert "compressed" in v2.tags and v2.metrics["rank_99"] <= rank and v2.spectrum
    assert v1.metrics["rank_99"] == spectrum["rank_99"]  # stored at publish

    em_full, em_small = (
        heldout_exact_match(tiny_base_dir, d1),
        heldout_exact_match(tiny_base_dir, d2),
    )
    print(f"r=16 → rank {rank}: exact match {em_full:.0%} → {em_small:.0%}, size {ratio:.3f}×")
    assert em_full >= 0.9 and em_small >= 0.95 * em_full

    # PEFT loads the compressed version and gives the logits ours gives
    batch = torch.tensor([[1, 5, 9, 13, 2, 7]])
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], d2).eval()
    ours, _ = load_base(tiny_base_dir)
    load_adapter(ours, d2)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(batch).logits, ours.eval()(batch).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip

    client = TestClient(create_app(load_settings({"LORAFLEET_API_TOKEN": "adm"}), registry))
    r = client.get("/v1/adapters/demo/digits:2/spectrum", headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200 and r.json()["r"] == rank and len(r.json()["layers"]) == 4
