"""DPO and reinforcement (GRPO) through the scheduler on a real Ray cluster, packed with a
supervised job on the same base: the training core's one step serves the three methods in one
forward. The DPO member's per-step losses equal the same job trained alone (≤ 1e-4), its first
loss is ln 2 (the reference is the adapter off), and its TRL-named rewards reach the events
and the version; the GRPO member samples in the pack and reports its rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from infra.servers import wait_until
from orchestrator.runner import build_distributed_spec
from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
from orchestrator.service import submit_job
from orchestrator.spec import parse_spec
from orchestrator.uploads import upload_dataset
from storage.catalog import jobs
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.demo_task import TRAIN_FILE
from workers.training.methods import Method
from workers.training.recipe import LoraFinetuneRecipe


def preference_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """A preference task the tiny base can learn: the counting answer over a refusal."""
    rows = []
    for i in range(offset, offset + n):
        a = i % 7
        rows.append({
            "input": {"messages": [{"role": "user", "content": f"spell {a} {a + 1} ="}]},
            "preferred_output": [{"role": "assistant", "content": f"{a} {a + 1} {a + 2}"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        })  # fmt: skip
    return rows


@pytest.fixture()
def env(ray_cluster, tmp_path, tiny_base_dir):  # type: ignore[no-untyped-def]
    settings = load_settings({"LORAFLEET_HOME": str(tmp_path / "home")})
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=tiny_base_dir)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(32)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"spell {i} ="}],
        "reference": f"{i} {i + 1} {i + 2}"}) + "\n" for i in range(8)))  # fmt: skip
    return settings, registry, prefs, prompts


def _up(registry: Registry, path: Path) -> str:
    record, _ = upload_dataset(registry, path, namespace="team", filename=path.name,
                               max_bytes=1 << 30)  # fmt: skip
    return record.id


def _events(registry: Registry, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in jobs.iter_events(registry.catalog, job_id=job_id, kinds=[kind])]


def test_a_dpo_job_packs_with_an_sft_job_and_trains_as_it_would_alone(env, tiny_base_dir):
    settings, registry, prefs, prompts = env
    db = registry.catalog
    training = {"max_steps": 12, "batch_size": 4, "seq_len": 48, "eval_every": 6,
                "warmup_steps": 2, "lr": 5e-3}  # fmt: skip
    dpo = parse_spec({
        "name": "prefer", "namespace": "team", "base_model": "tiny",
        "training_data": _up(registry, prefs), "output_adapter": "team/prefer",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        "lora": {"r": 4, "targets": ["q_proj", "v_proj"]}, "training": training,
    })  # fmt: skip
    sft = parse_spec({
        "name": "count", "namespace": "team", "base_model": "tiny",
        "training_data": _up(registry, TRAIN_FILE), "output_adapter": "team/count",
        "lora": {"r": 4}, "training": {**training, "seed": 1},
    })  # fmt: skip
    grader = {"type": "text_similarity", "input": "{{sample.output_text}}",
              "reference": "{{item.reference}}", "evaluation_metric": "fuzzy_match"}  # fmt: skip
    rl = parse_spec({
        "name": "reward", "namespace": "team", "base_model": "tiny",
        "training_data": _up(registry, prompts), "output_adapter": "team/reward",
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": grader, "hyperparameters": {"group_size": 4, "max_new_tokens": 6}}},
        "lora": {"r": 4}, "training": {**training, "seed": 2},
    })  # fmt: skip
    a, b, c = (submit_job(db, s).job for s in (dpo, sft, rl))
    loop = SchedulerLoop(SchedulerCore(db, ray_hooks(settings)), 0.2).start()
    try:
        wait_until(lambda: all(jobs.get_job(db, job_id=j.id).state == "succeeded"
                               for j in (a, b, c)),
                   timeout_s=300, what="the three jobs to succeed")  # fmt: skip
    finally:
        loop.stop()
    pack_id = jobs.get_job(db, job_id=a.id).pack_id
    assert pack_id is not None
    assert {jobs.get_job(db, job_id=j.id).pack_id for j in (b, c)} == {pack_id}
    rewards = {e["step"]: e for e in _events(registry, c.id, "metrics")}
    assert sorted(rewards) == list(range(1, 13))
    assert all(0.0 <= e["reward/mean"] <= 1.0 and e["reward/std"] >= 0 for e in rewards.values())
    assert registry.resolve("team/reward").hyperparameters["method"]["type"] == "reinforcement"

    metrics = {e["step"]: e for e in _events(registry, a.id, "metrics")}
    assert sorted(metrics) == list(range(1, 13))
    assert math.isclose(metrics[1]["loss"], math.log(2), abs_tol=1e-5)
    assert metrics[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(metrics[12])
    assert "eval_rewards/accuracies" in metrics[12]

    # the same job alone, through the same spec mapping: the same losses step by step
    job = jobs.get_job(db, job_id=a.id)
    dspec = build_distributed_spec(job, settings, registry)
    model, tok = load_base(tiny_base_dir)
    method = Method.from_dict(dspec.method)
    items = method.load(prefs, tok, seq_len=dspec.train.seq_len)
    recipe = LoraFinetuneRecipe(model, dspec.lora, dspec.train, pad_id=tok.pad_token_id,
                                objective=method.objective())  # fmt: skip
    recipe.setup()
    alone = [recipe.train_step(items).loss for _ in range(12)]
    packed = [metrics[s]["loss"] for s in range(1, 13)]
    assert max(abs(x - y) for x, y in zip(alone, packed, strict=True)) <= 1e-4
    assert packed[-1] < math.log(2)

    version = registry.resolve("team/prefer")
    assert version.hyperparameters["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"beta": 0.2}},
    }
    assert version.metrics["method"] == "dpo"


def test_dpo_after_sft_warm_starts_from_the_catalog(env):
    """``init_adapter`` names a catalog version: the DPO job starts from it (its config, its
    weights), its reference is that adapter frozen (first loss ln 2), and the new version's
    lineage names the exact version it began from."""
    settings, registry, prefs, _ = env
    db = registry.catalog
    training = {"max_steps": 6, "batch_size": 4, "seq_len": 48, "eval_every": 0,
                "warmup_steps": 0, "lr": 5e-3}  # fmt: skip
    sft = parse_spec({
        "name": "base-sft", "namespace": "team", "base_model": "tiny",
        "training_data": _up(registry, TRAIN_FILE), "output_adapter": "team/base-sft",
        "lora": {"r": 6, "alpha": 12, "targets": ["q_proj", "k_proj", "v_proj"]},
        "training": training,
    })  # fmt: skip
    loop = SchedulerLoop(SchedulerCore(db, ray_hooks(settings)), 0.2).start()
    try:
        first = submit_job(db, sft).job
        wait_until(lambda: jobs.get_job(db, job_id=first.id).state == "succeeded",
                   timeout_s=180, what="the SFT job")  # fmt: skip
        dpo = parse_spec({
            "name": "after-sft", "namespace": "team", "base_model": "tiny",
            "training_data": _up(registry, prefs), "output_adapter": "team/after-sft",
            "method": {"type": "dpo"}, "init_adapter": "team/base-sft", "training": training,
        })  # fmt: skip
        second = submit_job(db, dpo).job
        wait_until(lambda: jobs.get_job(db, job_id=second.id).state in ("succeeded", "failed"),
                   timeout_s=180, what="the DPO job")  # fmt: skip
    finally:
        loop.stop()
    done = jobs.get_job(db, job_id=second.id)
    assert done.state == "succeeded", done.error
    assert done.pack_id is None  # a warm start trains alone
    losses = [e["loss"] for e in _events(registry, second.id, "metrics")]
    assert math.isclose(losses[0], math.log(2), abs_tol=1e-5)
    version = registry.resolve("team/after-sft")
    assert version.hyperparameters["init_adapter"] == "team/base-sft:1"
    assert version.r == 6  # the starting adapter's config, not the spec's default lora
    with pytest.raises(Exception, match="namespace"):
        parse_spec({**dpo.model_dump(), "init_adapter": "other/base-sft"})
