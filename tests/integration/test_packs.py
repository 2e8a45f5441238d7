"""Packed training through the scheduler on a real Ray cluster.

Three different jobs submitted together train as one pack (one worker group); a fourth joins
it while it runs; one is cancelled mid-run; the pack's worker is killed and Ray Train restarts
the group, every job resuming from its own checkpoint. Every job that finishes must have the
per-step losses and the adapter of the same job trained alone (fp32, ≤ 1e-4).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from infra.servers import wait_until
from orchestrator.pack_runner import pack_alive
from orchestrator.runner import build_distributed_spec
from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
from orchestrator.service import cancel_job, submit_job
from orchestrator.spec import parse_spec
from orchestrator.uploads import upload_dataset
from storage.catalog import jobs, packs
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.datasets import load_dataset
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE
from workers.lora import lora_state_dict
from workers.training.recipe import LoraFinetuneRecipe


@pytest.fixture()
def env(ray_cluster, tmp_path, tiny_base_dir):  # type: ignore[no-untyped-def]
    settings = load_settings({"LORAFLEET_HOME": str(tmp_path / "home")})
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=tiny_base_dir)
    return settings, registry


def _spec(registry: Registry, name: str, lora: dict[str, Any], training: dict[str, Any]) -> Any:
    def up(path: Path) -> str:
        record, _ = upload_dataset(registry, path, namespace="team", filename=path.name,
                                   max_bytes=1 << 30)  # fmt: skip
        return record.id

    return parse_spec({
        "name": name, "namespace": "team", "base_model": "tiny",
        "training_data": up(TRAIN_FILE), "validation_data": up(HELDOUT_FILE),
        "output_adapter": f"team/{name}", "lora": lora, "max_failures": 1,
        "training": {"eval_every": 0, "checkpoint_every": 5, "warmup_steps": 2, **training},
    })  # fmt: skip


def _events(registry: Registry, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in jobs.iter_events(registry.catalog, job_id=job_id, kinds=[kind])]


def _losses(registry: Registry, job_id: str) -> dict[int, float]:
    """Step → loss as reported; a step run again after a restart reports its last value."""
    return {e["step"]: e["loss"] for e in _events(registry, job_id, "metrics")}


def _solo(job: jobs.Job, settings: Any, registry: Registry, base_dir: Path) -> Any:
    """The same job trained alone in this process: (per-step losses, LoRA state dict)."""
    dspec = build_distributed_spec(job, settings, registry)
    model, tokenizer = load_base(base_dir)
    examples = load_dataset(TRAIN_FILE, tokenizer, seq_len=dspec.train.seq_len)
    recipe = LoraFinetuneRecipe(model, dspec.lora, dspec.train, pad_id=tokenizer.pad_token_id)
    recipe.setup()
    losses = {}
    while recipe.step < dspec.train.max_steps:
        report = recipe.train_step(examples)
        losses[report.step] = report.loss
    return losses, lora_state_dict(model)


def test_a_pack_trains_each_job_as_alone_through_join_cancel_and_a_worker_kill(env, tiny_base_dir):  # type: ignore[no-untyped-def]
    import ray

    settings, registry = env
    db = registry.catalog
    total_cpus = ray.cluster_resources()["CPU"]
    first = [
        _spec(registry, "alpha", {"r": 4, "targets": ["q_proj", "v_proj"]},
              {"max_steps": 60, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "seed": 0}),
        _spec(registry, "beta", {"r": 8, "alpha": 8, "targets": "all-linear", "rslora": True},
              {"max_steps": 60, "batch_size": 2, "seq_len": 48, "lr": 2e-3, "seed": 1}),
        _spec(registry, "gamma", {"r": 2, "targets": ["k_proj", "o_proj"]},
              {"max_steps": 5000, "batch_size": 3, "seq_len": 64, "seed": 2}),
    ]  # fmt: skip
    a, b, c = (submit_job(db, s).job for s in first)
    loop = SchedulerLoop(SchedulerCore(db, ray_hooks(settings)), 0.2).start()
    try:
        wait_until(lambda: len(_losses(registry, a.id)) >= 3, timeout_s=120,
                   what="the pack to train")  # fmt: skip
        pack_id = jobs.get_job(db, job_id=a.id).pack_id
        assert pack_id is not None and pack_alive(pack_id)
        assert {jobs.get_job(db, job_id=j.id).pack_id for j in (b, c)} == {pack_id}
        # a late joiner takes a free slot of the running pack at a step boundary
        d = submit_job(db, _spec(registry, "delta", {"r": 4, "targets": ["v_proj"]},
                                 {"max_steps": 40, "batch_size": 4, "seq_len": 64, "lr": 4e-3,
                                  "seed": 3})).job  # fmt: skip
        wait_until(lambda: len(_losses(registry, d.id)) >= 7, timeout_s=60,
                   what="the joiner to train past a checkpoint")  # fmt: skip
        assert jobs.get_job(db, job_id=d.id).pack_id == pack_id
        assert _events(registry, d.id, "packed")[0]["pack_id"] == pack_id
        # a cancelled member leaves at the next step; the others train on
        cancel_job(db, job_id=c.id)
        wait_until(lambda: c.id not in packs.get_pack(db, pack_id=pack_id).jobs, timeout_s=30,
                   what="the cancelled job to leave")  # fmt: skip
        # the worker dies: Ray Train restarts the group, each job resumes from its checkpoint
        pid = _events(registry, a.id, "placement_group")[0]["rank0_pid"]
        assert len(_losses(registry, a.id)) < 60, "the pack ended before the kill"
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: all(jobs.get_job(db, job_id=j.id).state == "succeeded" for j in (a, b, d)),
            timeout_s=240,
            what="the pack's jobs to succeed",
        )
        wait_until(lambda: not pack_alive(pack_id), timeout_s=60, what="the pack runner to end")
        wait_until(lambda: ray.available_resources().get("CPU", 0) >= total_cpus, timeout_s=60,
                   what="the pack's resources back")  # fmt: skip
    finally:
        loop.stop()
    assert jobs.get_job(db, job_id=c.id).state == "cancelled"
    assert registry.list(namespace="team", name="gamma") == []
    pack = packs.get_pack(db, pack_id=pack_id)
    assert pack.state == "closed" and pack.jobs == ()
    for job in (a, b, d):
        assert _events(registry, job.id, "resumed"), f"{job.name} did not resume"
        losses, state = _solo(jobs.get_job(db, job_id=job.id), settings, registry, tiny_base_dir)
        packed = _losses(registry, job.id)
        assert sorted(packed) == sorted(losses)
        worst = max(abs(packed[s] - losses[s]) for s in losses)
        assert worst <= 1e-4, f"{job.name}: per-step loss differs from its solo run by {worst}"
        version, path = registry.fetch(f"team/{job.name}")
        published = load_file(str(path / "adapter_model.safetensors"))
        assert published.keys() == state.keys()
        for key, tensor in state.items():
            torch.testing.assert_close(published[key], tensor, atol=1e-4, rtol=0)
        # lineage: packed, in which pack, with how many
        assert version.metrics["pack"]["id"] == pack_id
        assert version.metrics["pack"]["jobs"] >= 3
        assert c.id in version.metrics["pack"]["packed_with"]
