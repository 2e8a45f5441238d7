"""The control plane on a real Ray cluster: admission order, quotas, cancel, failure, recovery."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from infra.servers import wait_until
from orchestrator.runner import kill_runner, runner_alive
from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
from orchestrator.service import cancel_job, submit_job
from orchestrator.spec import parse_spec
from orchestrator.uploads import upload_dataset
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.registry import Registry
from storage.settings import load_settings
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE


@pytest.fixture()
def env(ray_cluster, tmp_path, tiny_base_dir):  # type: ignore[no-untyped-def]
    settings = load_settings({"LORAFLEET_HOME": str(tmp_path / "home")})
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=tiny_base_dir)
    return settings, registry


def _upload(registry, path, namespace="team"):  # type: ignore[no-untyped-def]
    record, _ = upload_dataset(registry, Path(path), namespace=namespace, filename=Path(path).name,
                               max_bytes=1 << 30)  # fmt: skip
    return record.id


def _spec(
    registry,
    name,
    *,
    priority=0,
    steps=6,
    workers=1,
    nodes=1,
    ckpt=0,
    ns="team",
    seq_len=64,
    packing=True,
    lora=None,
):  # type: ignore[no-untyped-def]
    return parse_spec({
        "name": name, "namespace": ns, "base_model": "tiny",
        "training_data": _upload(registry, TRAIN_FILE, ns),
        "validation_data": _upload(registry, HELDOUT_FILE, ns),
        "output_adapter": f"{ns}/{name}", "priority": priority, "packing": packing,
        "training": {"max_steps": steps, "batch_size": 4, "seq_len": seq_len, "eval_every": 0,
                     "checkpoint_every": ckpt},
        "resources": {"nodes": nodes, "workers_per_node": workers},
        **({"lora": lora} if lora else {}),
    })  # fmt: skip


def _loop(settings, registry):  # type: ignore[no-untyped-def]
    return SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.2).start()


def _metrics_events(registry, job_id):  # type: ignore[no-untyped-def]
    """How many steps the job has reported so far."""
    return sum(e.kind == "metrics" for e in jobs.list_events(registry.catalog, job_id=job_id))


def _state(registry, job_id):  # type: ignore[no-untyped-def]
    return jobs.get_job(registry.catalog, job_id=job_id).state


def test_limit_priority_order_and_publish(env):
    settings, registry = env
    repo.set_namespace_limits(registry.catalog, namespace="team", max_concurrent_jobs=1,
                              max_priority=5)  # fmt: skip
    a = submit_job(registry.catalog, _spec(registry, "low-a")).job
    b = submit_job(registry.catalog, _spec(registry, "low-b")).job
    c = submit_job(registry.catalog, _spec(registry, "high", priority=5)).job
    loop = _loop(settings, registry)
    try:
        wait_until(
            lambda: all(_state(registry, j.id) == "succeeded" for j in (a, b, c)),
            timeout_s=240,
            what="three jobs to succeed",
        )
    finally:
        loop.stop()
    done = {j.id: jobs.get_job(registry.catalog, job_id=j.id) for j in (a, b, c)}
    order = sorted(done.values(), key=lambda j: j.started_at)
    assert [j.name for j in order] == ["high", "low-a", "low-b"]
    for first, second in itertools.pairwise(order):
        assert second.started_at >= first.finished_at  # one after another
    version = registry.resolve("team/high")
    assert version.job_id == c.id and version.dataset_sha256
    assert version.base_model.name == "tiny" and "eval_loss_final" in version.metrics
    kinds = [e.kind for e in jobs.list_events(registry.catalog, job_id=c.id)]
    assert kinds.count("metrics") == 6 and "adapter" in kinds


def test_unfittable_job_waits_with_a_reason(env):
    settings, registry = env
    job = submit_job(registry.catalog, _spec(registry, "huge", nodes=5)).job
    core = SchedulerCore(registry.catalog, ray_hooks(settings))
    core.tick()
    shown = jobs.get_job(registry.catalog, job_id=job.id)
    assert shown.state == "queued" and "cannot fit the cluster" in shown.status_reason


def test_cancel_running_job(env):
    import ray

    settings, registry = env
    job = submit_job(registry.catalog, _spec(registry, "long", steps=400, workers=2)).job
    total = ray.cluster_resources()["CPU"]
    loop = _loop(settings, registry)
    try:
        wait_until(
            lambda: any(
                e.kind == "metrics" for e in jobs.list_events(registry.catalog, job_id=job.id)
            ),
            timeout_s=120,
            what="training to start",
        )
        t0 = time.monotonic()
        cancel_job(registry.catalog, job_id=job.id)
        cancel_job(registry.catalog, job_id=job.id)  # twice is harmless
        wait_until(lambda: not runner_alive(job.id), timeout_s=10, what="runner to stop")
        wait_until(
            lambda: ray.available_resources().get("CPU", 0) >= total,
            timeout_s=30,
            what="resources back",
        )
        assert time.monotonic() - t0 < 10 + 30
    finally:
        loop.stop()
    assert _state(registry, job.id) == "cancelled"
    assert registry.list(namespace="team", name="long") == []
    assert not list(Path("/dev/shm").glob(f"lorafleet-base-{job.id}-*"))


def test_failing_job_records_the_error(env, tmp_path):
    settings, registry = env
    # valid rows (uploads are validated), but no target token survives seq_len=2
    job = submit_job(registry.catalog, _spec(registry, "broken", seq_len=2)).job
    loop = _loop(settings, registry)
    try:
        wait_until(lambda: _state(registry, job.id) == "failed", timeout_s=60, what="failure")
    finally:
        loop.stop()
    assert "seq_len=2" in jobs.get_job(registry.catalog, job_id=job.id).error


def test_scheduler_restart_reconciles_exactly_once(env):
    settings, registry = env
    job = submit_job(registry.catalog, _spec(registry, "survivor", steps=40, ckpt=5)).job
    loop = _loop(settings, registry)
    wait_until(
        lambda: _metrics_events(registry, job.id) >= 12,
        timeout_s=120,
        what="a checkpoint to exist",
    )
    loop.stop()  # the scheduler dies; the detached runner does not
    kill_runner(job.id)  # … and here its runner dies too: the job must be resumed, once
    loop = _loop(settings, registry)  # a new scheduler reconciles from the catalog
    try:
        wait_until(
            lambda: _state(registry, job.id) == "succeeded",
            timeout_s=180,
            what="resumed job to succeed",
        )
    finally:
        loop.stop()
    states = [
        e.data.get("state")
        for e in jobs.list_events(registry.catalog, job_id=job.id)
        if e.kind == "state"
    ]
    assert "retrying" in states and states.count("succeeded") == 1
    resumed = [
        e.data for e in jobs.list_events(registry.catalog, job_id=job.id) if e.kind == "resumed"
    ]
    assert resumed and resumed[0]["from_step"] >= 5  # continued from a checkpoint
    assert len(registry.list(namespace="team", name="survivor")) == 1
    assert len(jobs.list_jobs(registry.catalog, namespace="team")) == 1


def test_scheduler_actor_restarted_by_ray_mid_job(env):
    """The detached scheduler actor is killed while a job runs; Ray restarts it; one result."""
    import ray

    from orchestrator.scheduler import start_scheduler_actor

    settings, registry = env
    actor = start_scheduler_actor(settings, interval_s=0.2)
    job = submit_job(registry.catalog, _spec(registry, "steady", steps=20)).job
    try:
        wait_until(lambda: _state(registry, job.id) == "running", timeout_s=120, what="running")
        ray.kill(actor, no_restart=False)  # max_restarts=-1: Ray brings it back
        wait_until(
            lambda: _state(registry, job.id) == "succeeded", timeout_s=180, what="job to succeed"
        )
        # the restarted actor answers and its loop runs again
        wait_until(lambda: ray.get(actor.ticks.remote(), timeout=30) >= 1, timeout_s=30,
                   what="the restarted scheduler to tick")  # fmt: skip
    finally:
        ray.kill(actor, no_restart=True)
    states = [
        e.data.get("state")
        for e in jobs.list_events(registry.catalog, job_id=job.id)
        if e.kind == "state"
    ]
    assert states.count("succeeded") == 1 and "retrying" not in states
    assert len(registry.list(namespace="team", name="steady")) == 1


def test_killed_worker_is_retried_and_the_job_succeeds(env):
    import os
    import signal

    settings, registry = env
    spec = _spec(registry, "sturdy", steps=30, ckpt=5)
    spec = spec.model_copy(update={"max_failures": 1})
    job = submit_job(registry.catalog, spec).job
    loop = _loop(settings, registry)
    try:
        wait_until(
            lambda: _metrics_events(registry, job.id) >= 8,
            timeout_s=120,
            what="a checkpoint",
        )
        pid = next(
            e.data["rank0_pid"]
            for e in jobs.list_events(registry.catalog, job_id=job.id)
            if e.kind == "placement_group"
        )
        os.kill(pid, signal.SIGKILL)  # the worker dies; Ray Train restarts the group
        wait_until(
            lambda: _state(registry, job.id) == "succeeded",
            timeout_s=180,
            what="job to succeed after the worker died",
        )
    finally:
        loop.stop()
    kinds = [e.kind for e in jobs.list_events(registry.catalog, job_id=job.id)]
    assert "resumed" in kinds
    assert len(registry.list(namespace="team", name="sturdy")) == 1


def test_two_namespaces_share_the_cluster(env):
    """Four 2-worker jobs from two teams on 4 CPUs: the first two to run are one per team."""
    settings, registry = env
    specs = []
    for ns in ("red", "red", "blue", "blue"):
        # alone: this is about whole gangs sharing the cluster (packing is test_packs')
        specs.append(_spec(registry, f"{ns}-{len(specs)}", workers=2, steps=4, ns=ns,
                           packing=False))  # fmt: skip
    submitted = [submit_job(registry.catalog, s).job for s in specs]
    import ray

    total = ray.cluster_resources()["CPU"]  # earlier tests' runs release their groups async
    wait_until(
        lambda: ray.available_resources().get("CPU", 0) >= total,
        timeout_s=60,
        what="an idle cluster",
    )
    core = SchedulerCore(registry.catalog, ray_hooks(settings))
    decision = core.tick()
    admitted = {jobs.get_job(registry.catalog, job_id=j).namespace for j in decision.admit}
    assert admitted == {"red", "blue"}
    # (that every admitted job runs to the end is test_limit_priority_order_and_publish's)
    for j in submitted:
        cancel_job(registry.catalog, job_id=j.id)
    loop = SchedulerLoop(core, 0.2).start()
    try:
        wait_until(lambda: not any(runner_alive(j) for j in decision.admit), timeout_s=120,
                   what="the admitted runners to stop")  # fmt: skip
        wait_until(lambda: ray.available_resources().get("CPU", 0) >= total, timeout_s=60,
                   what="the cluster to be idle again")  # fmt: skip
    finally:
        loop.stop()


def test_dora_qlora_adalora_jobs_train_alone_and_publish_what_peft_reads(env, tiny_base_dir):
    """Two LoRA jobs, a DoRA, a QLoRA (NF4 base) and an AdaLoRA job admitted in one tick: the
    LoRA jobs pack; the others (methods the packed layer lacks, a base the pack does not share)
    train alone. Each version loads in PEFT with our logits: a DoRA adapter, a plain one for the
    unquantized base, an AdaLoRA one pruned to its budget."""
    import torch
    from peft import PeftModel

    from workers.base_model import load_base
    from workers.lora import load_adapter

    settings, registry = env
    dora = {"r": 4, "alpha": 8, "method": "dora", "targets": ["q_proj", "v_proj"]}
    qlora = {"r": 4, "alpha": 8, "base_quantization": "nf4"}
    specs = [_spec(registry, "lora-a", steps=4), _spec(registry, "lora-b", steps=4),
             _spec(registry, "dora", steps=4, lora=dora),
             _spec(registry, "qlora", steps=4, lora=qlora),
             _spec(registry, "ada", steps=10,
                   lora={"r": 6, "alpha": 8, "variant": "adalora", "target_r": 2})]  # fmt: skip
    submitted = {s.name: submit_job(registry.catalog, s).job.id for s in specs}
    loop = _loop(settings, registry)
    packs_seen: dict[str, str] = {}
    try:

        def done() -> bool:
            for name, job_id in submitted.items():
                job = jobs.get_job(registry.catalog, job_id=job_id)
                if job.pack_id is not None:  # the pack a job trained in (cleared as it ends)
                    packs_seen.setdefault(name, job.pack_id)
            return all(_state(registry, j) in ("succeeded", "failed") for j in submitted.values())

        wait_until(done, timeout_s=360, what="five jobs to finish")
    finally:
        loop.stop()
    assert all(_state(registry, j) == "succeeded" for j in submitted.values())
    assert packs_seen.get("lora-a") and packs_seen.get("lora-a") == packs_seen.get("lora-b")
    assert not {"dora", "qlora", "ada"} & set(packs_seen)  # never in a pack
    version = registry.resolve("team/dora")
    # lora.method is the variant's old spelling: read as lora.variant, recorded as that
    assert version.method == "dora" and version.hyperparameters["lora"]["variant"] == "dora"
    assert registry.resolve("team/lora-a").method == "lora"
    q = registry.resolve("team/qlora")
    assert q.method == "lora" and q.hyperparameters["lora"]["base_quantization"] == "nf4"
    ada = registry.resolve("team/ada")
    assert ada.method == "adalora" and ada.r == 6
    batch = torch.tensor([[1, 4, 9, 16, 25]])
    for v, method in ((version, "dora"), (q, "lora"), (ada, "adalora")):
        _, directory = registry.fetch(v)
        peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], directory).eval()
        ours, _ = load_base(tiny_base_dir)
        assert load_adapter(ours, directory).method == method
        with torch.no_grad():
            torch.testing.assert_close(peft_model(batch).logits, ours.eval()(batch).logits,
                                       atol=1e-5, rtol=0)  # fmt: skip
