"""Jobs ride out the outages a real cluster has: the catalog's PostgreSQL restarted mid-job,
the object store unreachable for 10 s while a checkpoint is written. (A serving replica killed
under load: ``test_serving_app``.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.servers import (
    OutageProxy,
    fresh_database,
    postgres_cluster,
    require_postgres,
    wait_until,
)
from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
from orchestrator.service import submit_job
from orchestrator.spec import parse_spec
from orchestrator.uploads import upload_dataset
from storage.catalog import jobs
from storage.catalog.db import Catalog
from storage.registry import Registry
from storage.settings import load_settings
from storage.staging import checkpoints
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE


def _spec(registry: Registry, name: str, steps: int, ckpt: int = 0) -> object:
    def upload(path: Path) -> str:
        record, _ = upload_dataset(registry, path, namespace="team", filename=path.name,
                                   max_bytes=1 << 30)  # fmt: skip
        return record.id

    return parse_spec({
        "name": name, "namespace": "team", "base_model": "tiny",
        "training_data": upload(TRAIN_FILE), "validation_data": upload(HELDOUT_FILE),
        "output_adapter": f"team/{name}",
        "training": {"max_steps": steps, "batch_size": 4, "seq_len": 32, "eval_every": 0,
                     "checkpoint_every": ckpt},
    })  # fmt: skip


def _events(registry: Registry, job_id: str, kind: str) -> list[jobs.JobEvent]:
    return list(jobs.iter_events(registry.catalog, job_id=job_id, kinds=[kind]))


def _newest_checkpoint(registry: Registry, job_id: str) -> int:
    """The newest checkpoint step in the object store (the catalog is not asked)."""
    found = checkpoints(registry.store, job_id)
    return found[0][0] if found else 0


def _state(registry: Registry, job_id: str) -> str:
    return jobs.get_job(registry.catalog, job_id=job_id).state


@pytest.fixture()
def restartable_postgres() -> Iterator[object]:
    try:
        cm = postgres_cluster()
        cluster = cm.__enter__()
    except RuntimeError as exc:
        if require_postgres():
            pytest.fail(f"LORAFLEET_REQUIRE_POSTGRES is set but no cluster can be made: {exc}")
        pytest.skip(f"no throwaway PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cm.__exit__(None, None, None)


def test_postgres_restarted_mid_job_the_job_finishes_and_no_event_is_lost(
    ray_cluster: object, restartable_postgres, tmp_path: Path, tiny_base_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    pg = restartable_postgres
    with fresh_database(pg.url) as url:
        settings = load_settings({"LORAFLEET_HOME": str(tmp_path / "home"),
                                  "LORAFLEET_CATALOG_URL": url})  # fmt: skip
        Catalog(url).upgrade()
        registry = Registry.from_settings(settings)
        registry.register_base(name="tiny", path=tiny_base_dir)
        steps = 200  # ~15 s of training: the 4 s outage falls well inside
        job = submit_job(registry.catalog, _spec(registry, "through-pg", steps, ckpt=10)).job
        loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.2).start()
        try:
            wait_until(lambda: len(_events(registry, job.id, "metrics")) >= 5, timeout_s=180,
                       what="training to report steps")  # fmt: skip
            pg.stop()  # immediate: every connection drops, as in a crash
            # the catalog stays down until training has visibly gone on without it: a newer
            # checkpoint reaches the object store while its events can only queue
            before = _newest_checkpoint(registry, job.id)
            wait_until(lambda: _newest_checkpoint(registry, job.id) >= before + 20,
                       timeout_s=120, what="training to go on without the catalog")  # fmt: skip
            pg.start()
            # the outage fell inside the job: it was still running when the catalog came back
            assert _state(registry, job.id) == "running"
            wait_until(lambda: _state(registry, job.id) in ("succeeded", "failed"),
                       timeout_s=300, what="the job to end")  # fmt: skip
        finally:
            loop.stop()
        done = jobs.get_job(registry.catalog, job_id=job.id)
        assert done.state == "succeeded" and done.attempts == 1, done.error
        reported = [e.data["step"] for e in _events(registry, job.id, "metrics")]
        assert reported == list(range(1, steps + 1))  # every step once, in order
        assert registry.resolve("team/through-pg").state == "ready"
        registry.catalog.dispose()


def test_object_store_down_for_10_s_during_a_checkpoint_is_ridden_out(
    ray_cluster: object, moto_s3, tmp_path: Path, tiny_base_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    proxy = OutageProxy(int(moto_s3.endpoint.rsplit(":", 1)[1]))
    try:
        settings = load_settings({
            "LORAFLEET_HOME": str(tmp_path / "home"),
            "LORAFLEET_OBJECT_STORE": f"s3://chaos-{time.time_ns() % 10**9}/lf",
            "LORAFLEET_S3_ENDPOINT": proxy.url,
        })  # fmt: skip
        registry = Registry.from_settings(settings)
        registry.store.ensure_bucket()  # type: ignore[attr-defined]
        registry.register_base(name="tiny", path=tiny_base_dir)
        job = submit_job(registry.catalog, _spec(registry, "through-s3", 80, ckpt=5)).job
        loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.2).start()
        try:
            wait_until(lambda: bool(_events(registry, job.id, "checkpoint")), timeout_s=180,
                       what="a first checkpoint")  # fmt: skip
            proxy.down()
            # down for 10 s, and long enough that the job has hit the outage: a checkpoint
            # upload was refused (the worker keeps retrying it)
            down_at = time.monotonic()
            wait_until(lambda: proxy.refused >= 3 and time.monotonic() - down_at >= 10,
                       timeout_s=120, what="the job to hit the outage")  # fmt: skip
            proxy.up()
            up_at = time.time()
            wait_until(lambda: _state(registry, job.id) in ("succeeded", "failed"),
                       timeout_s=300, what="the job to end")  # fmt: skip
        finally:
            loop.stop()
        done = jobs.get_job(registry.catalog, job_id=job.id)
        assert done.state == "succeeded" and done.attempts == 1, done.error  # retried in place
        ckpts = _events(registry, job.id, "checkpoint")
        # the checkpoint due during the outage waited for the store and was then written
        stalled = [e for e in ckpts if e.ts.timestamp() >= up_at]
        assert stalled and stalled[0].data["step"] < 80
        assert [e.data["step"] for e in ckpts] == list(range(5, 80, 5))
        metrics = _events(registry, job.id, "metrics")
        assert [e.data["step"] for e in metrics] == list(range(1, 81))
        assert registry.resolve("team/through-s3").state == "ready"
    finally:
        proxy.close()
