"""lm-evaluation-harness, unmodified from PyPI, against ``lorafleet serve`` and against PEFT.

``lm_eval --model local-completions`` sends token-id prompts in batches and asks for ``echo``
and ``logprobs`` (its log-likelihood requests) and for greedy generations with stop strings
(``generate_until``), to ``lorafleet serve`` on SmolLM2 with an adapter from the catalog;
``lm_eval --model hf`` with ``peft=`` runs the same two tasks (shipped with the tests: local
JSONL, no downloads) on the same adapter in-process. Every sample's log-likelihood agrees
within 2e-3, the greedy flags, the accuracies and every generated answer are equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.servers import free_port, wait_until

TASKS = Path(__file__).parent / "lm_eval_tasks"
ADMIN = "lm-eval-admin-token-0123456789"
REF = "evals/smol-lora"


def _adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA on SmolLM2 that visibly moves its answers (random B, as after some training)."""
    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter

    model, _ = load_base(base_dir)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    inject_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    return save_adapter(model, cfg, out)


def _tasks(where: Path) -> Path:
    """The shipped tasks, their data paths made absolute."""
    where.mkdir()
    for f in TASKS.iterdir():
        (where / f.name).write_text(f.read_text().replace("DATA_DIR", str(where)))
    return where


def _lm_eval(model: str, model_args: str, tasks: Path, out: Path, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", "lorafleet_mc,lorafleet_gen", "--include_path", str(tasks),
           "--log_samples", "--output_path", str(out), "--batch_size", "4"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-4000:]


def _samples(out: Path, task: str) -> list[dict[str, Any]]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _results(out: Path) -> dict[str, Any]:
    (path,) = out.rglob("results_*.json")
    return dict(json.loads(path.read_text())["results"])


def test_lm_eval_scores_a_served_adapter_as_it_scores_peft(
    smollm_dir: Path, tmp_path: Path
) -> None:
    from storage.registry import Registry
    from storage.settings import load_settings

    home = tmp_path / "home"
    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(home)}))
    registry.register_base(name="smollm2", path=smollm_dir)
    adapter_dir = _adapter(smollm_dir, tmp_path / "adapter")
    version = registry.publish(adapter_dir=adapter_dir, ref=REF, base_model="smollm2")
    registry.catalog.dispose()

    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_API_TOKEN": ADMIN,
           "OPENAI_API_KEY": ADMIN, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("LORAFLEET_RAY_ADDRESS", None)
    tasks = _tasks(tmp_path / "tasks")
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--base", "smollm2", "--port",
         str(port), "--slots", "2", "--cpus-per-replica", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: up() or serve.poll() is not None, timeout_s=240, what="lorafleet serve")
        assert serve.poll() is None, serve.communicate()[1][-3000:]
        ours = tmp_path / "ours"
        _lm_eval("local-completions",
                 f"model={version.ref},base_url={url}/v1/completions,"
                 f"tokenizer_backend=huggingface,tokenizer={smollm_dir},tokenized_requests=True,"
                 "max_retries=1", tasks, ours, env)  # fmt: skip
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=120)
    theirs = tmp_path / "peft"
    _lm_eval("hf", f"pretrained={smollm_dir},peft={adapter_dir},dtype=float32", tasks, theirs,
             env)  # fmt: skip

    mine, peft = _samples(ours, "lorafleet_mc"), _samples(theirs, "lorafleet_mc")
    assert len(mine) == len(peft) == 12
    pairs = 0
    for a, b in zip(mine, peft, strict=True):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
        ):
            assert abs(float(lp_a) - float(lp_b)) < 2e-3, (a["doc_id"], lp_a, lp_b)
            assert greedy_a == greedy_b
            pairs += 1
    assert pairs == 48
    results_ours, results_peft = _results(ours), _results(theirs)
    assert results_ours["lorafleet_mc"]["acc,none"] == results_peft["lorafleet_mc"]["acc,none"]
    gen_ours, gen_peft = _samples(ours, "lorafleet_gen"), _samples(theirs, "lorafleet_gen")
    assert [r["filtered_resps"] for r in gen_ours] == [r["filtered_resps"] for r in gen_peft]
    assert all(r["filtered_resps"][0].strip() for r in gen_ours)  # real answers, not empty
    assert (results_ours["lorafleet_gen"]["exact_match,none"]
            == results_peft["lorafleet_gen"]["exact_match,none"])  # fmt: skip
    # the adapter moved the scores: this compares the adapter, not the bare base
    base_lp = _base_loglikelihood(smollm_dir, mine[0])
    assert abs(base_lp - float(mine[0]["resps"][0][0][0])) > 1e-3


def _base_loglikelihood(base_dir: Path, sample: dict[str, Any]) -> float:
    """The bare base's log-likelihood of a sample's first choice."""
    from workers.base_model import load_base

    model, tok = load_base(base_dir)
    args = sample["arguments"]["gen_args_0"]
    context, continuation = tok(args["arg_0"])["input_ids"], tok(args["arg_1"])["input_ids"]
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


pytestmark = pytest.mark.timeout(1500)
