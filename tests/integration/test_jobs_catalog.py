"""Jobs in the catalog on SQLite and PostgreSQL: idempotency, atomic transitions, events."""

from __future__ import annotations

import threading

import pytest

from storage.catalog import jobs
from storage.catalog.db import open_catalog

SPEC = {"name": "j", "namespace": "team", "training": {"lr": 0.001}}


@pytest.fixture()
def catalog(catalog_url):  # type: ignore[no-untyped-def]
    cat = open_catalog(catalog_url, auto_upgrade=True)
    yield cat
    cat.dispose()


def _run_threads(n, fn):  # type: ignore[no-untyped-def]
    results, errors = [], []
    barrier = threading.Barrier(n)

    def go() -> None:
        barrier.wait()
        try:
            results.append(fn())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_fifty_concurrent_submissions_with_one_key_make_one_job(catalog):
    results, errors = _run_threads(
        50,
        lambda: jobs.create_job(
            catalog, namespace="team", name="j", spec=SPEC, idempotency_key="k-1"
        ),
    )
    assert errors == []
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(jobs.list_jobs(catalog, namespace="team")) == 1


def test_same_key_different_spec_conflicts(catalog):
    jobs.create_job(catalog, namespace="team", name="j", spec=SPEC, idempotency_key="k")
    with pytest.raises(jobs.IdempotencyConflict, match="different spec"):
        jobs.create_job(
            catalog, namespace="team", name="j", spec={**SPEC, "x": 1}, idempotency_key="k"
        )
    # keys are per namespace
    _, created = jobs.create_job(
        catalog, namespace="other", name="j", spec=SPEC, idempotency_key="k"
    )
    assert created


def test_transitions_are_compare_and_set(catalog):
    job, _ = jobs.create_job(catalog, namespace="team", name="j", spec=SPEC)
    results, errors = _run_threads(
        8,
        lambda: jobs.transition_job(
            catalog, job_id=job.id, allowed_from={"queued"}, to="starting", count_attempt=True
        ),
    )
    assert len(results) == 1 and len(errors) == 7
    assert all(isinstance(e, jobs.JobStateConflict) for e in errors)
    running = jobs.transition_job(catalog, job_id=job.id, allowed_from={"starting"}, to="running")
    assert running.attempts == 1 and running.started_at is not None
    done = jobs.transition_job(
        catalog, job_id=job.id, allowed_from={"running"}, to="failed", error="boom"
    )
    assert done.state == "failed" and done.error == "boom" and done.finished_at is not None
    states = [e.data["state"] for e in jobs.list_events(catalog, job_id=job.id)]
    assert states == ["queued", "starting", "running", "failed"]


def test_events_scoping_and_listing(catalog):
    job, _ = jobs.create_job(catalog, namespace="team", name="j", spec=SPEC, priority=3)
    for step in range(3):
        jobs.add_event(catalog, job_id=job.id, kind="metrics", data={"step": step, "loss": 1.0})
    events = jobs.list_events(catalog, job_id=job.id)
    assert [e.kind for e in events] == ["state", "metrics", "metrics", "metrics"]
    later = jobs.list_events(catalog, job_id=job.id, after_id=events[1].id)
    assert [e.data.get("step") for e in later] == [1, 2]
    assert jobs.get_job(catalog, job_id=job.id, namespace="team").priority == 3
    with pytest.raises(jobs.JobNotFound):
        jobs.get_job(catalog, job_id=job.id, namespace="someone-else")
    jobs.update_job(
        catalog,
        job_id=job.id,
        status_reason="waiting for resources",
        checkpoint_uri="file:///ckpt/3",
    )
    shown = jobs.get_job(catalog, job_id=job.id)
    assert shown.status_reason == "waiting for resources"
    assert shown.checkpoint_uri == "file:///ckpt/3"
    assert [j.id for j in jobs.list_jobs(catalog, states={"queued"})] == [job.id]
    assert jobs.list_jobs(catalog, states={"running"}) == []
    # reading page by page (the CLI, the API's cursor) sees every job and event once, in order
    for i in range(6):
        jobs.create_job(catalog, namespace="team", name=f"more{i}", spec=SPEC)
    assert [j.id for j in jobs.iter_jobs(catalog, page=4)] == [j.id for j in
                                                               jobs.list_jobs(catalog)]  # fmt: skip
    for step in range(3, 9):
        jobs.add_event(catalog, job_id=job.id, kind="checkpoint" if step % 4 == 0 else "metrics",
                       data={"step": step})  # fmt: skip
    paged = list(jobs.iter_events(catalog, job_id=job.id, page=3))
    assert [e.id for e in paged] == [e.id for e in jobs.list_events(catalog, job_id=job.id)]
    only = jobs.iter_events(catalog, job_id=job.id, kinds=["checkpoint"], page=1)
    assert [e.data["step"] for e in only] == [4, 8]


def test_a_job_stored_under_the_old_spec_rules_does_not_stop_scheduling(catalog):
    """Queued before specs named file ids: its gang still reads; its runner fails it later."""
    from orchestrator.service import gang_of, job_spec
    from orchestrator.spec import SpecError

    old = {"name": "legacy", "namespace": "team", "base_model": "/models/base",
           "training_data": "/data/train.jsonl", "output_adapter": "team/legacy",
           "resources": {"nodes": 2, "workers_per_node": 3}}  # fmt: skip
    job, _ = jobs.create_job(catalog, namespace="team", name="legacy", spec=old, priority=0,
                             max_failures=0, idempotency_key=None)  # fmt: skip
    assert gang_of(job).nodes == 2 and gang_of(job).workers_per_node == 3
    with pytest.raises(SpecError, match=r"training_data|base_model"):
        job_spec(job)


def test_files_are_one_record_per_content_per_namespace(catalog):
    from storage.catalog import files

    digest = "ab" * 32
    results, errors = _run_threads(8, lambda: files.create_file(
        catalog, namespace="team", filename="d.jsonl", purpose="fine-tune", size=10, rows=1,
        sha256=digest))  # fmt: skip
    assert not errors and len({f.id for f, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    other, created = files.create_file(
        catalog, namespace="blue", filename="d.jsonl", purpose="fine-tune", size=10, rows=1,
        sha256=digest,
    )  # fmt: skip
    assert created and other.id != results[0][0].id  # namespaces never share a record
    deleted, left = files.delete_file(catalog, file_id=other.id, namespace="blue")
    assert deleted.id == other.id and left == 1  # team's record still names the bytes
    with pytest.raises(files.FileNotFound):
        files.get_file(catalog, file_id=results[0][0].id, namespace="blue")


def test_the_runner_fails_a_job_with_its_reason_whatever_it_raises(tmp_path, monkeypatch):
    """An unexpected exception (here an OverflowError) ends the job `failed` with the reason;
    it never escapes as a lost runner, which the scheduler would retry."""
    from orchestrator import runner
    from storage.settings import load_settings

    settings = load_settings({"LORAFLEET_HOME": str(tmp_path / "home")})
    from storage.registry import Registry

    db = Registry.from_settings(settings).catalog
    job, _ = jobs.create_job(db, namespace="team", name="j", spec=SPEC)
    jobs.transition_job(db, job_id=job.id, allowed_from={"queued"}, to="starting")

    def overflow(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(runner, "build_distributed_spec", overflow)
    assert runner.run_job(job.id, settings) == "failed"
    failed = jobs.get_job(db, job_id=job.id)
    assert failed.error is not None and failed.error.startswith("OverflowError: cannot convert")


class _FakeCluster:
    """The scheduler's cluster hooks, recorded: two 1-CPU slots, runners we kill by hand."""

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.started: list[str] = []
        self.killed: list[str] = []
        self.released: list[str] = []

    def hooks(self):  # type: ignore[no-untyped-def]
        from orchestrator.scheduler import ClusterHooks
        from orchestrator.scheduling import NodeFree

        def start(job_id: str) -> None:
            self.started.append(job_id)
            self.alive.add(job_id)

        def kill(job_id: str) -> bool:
            self.killed.append(job_id)
            self.alive.discard(job_id)
            return True

        def release(job_id: str) -> int:
            self.released.append(job_id)
            return 0

        free = lambda: [NodeFree(cpus=2 - len(self.alive), total_cpus=2)]  # noqa: E731
        return ClusterHooks(start, self.alive.__contains__, kill, release, free)


def test_scheduler_tick_admits_stops_cancelled_and_resumes_lost_runners(catalog):
    """SchedulerCore.tick over the real catalog with fake cluster hooks (no Ray)."""
    from orchestrator.scheduler import SchedulerCore
    from orchestrator.service import cancel_job

    cluster = _FakeCluster()
    core = SchedulerCore(catalog, cluster.hooks(), grace_s=3600)
    ids = [jobs.create_job(catalog, namespace="team", name=f"j{i}", spec=SPEC)[0].id
           for i in range(3)]  # fmt: skip
    decision = core.tick()
    assert decision.admit == ids[:2] and cluster.started == ids[:2]  # two slots, in order
    assert "waiting for resources" in decision.waiting[ids[2]]
    assert jobs.get_job(catalog, job_id=ids[2]).status_reason == decision.waiting[ids[2]]
    assert core.tick().admit == []  # a second tick changes nothing
    # a cancelled job's runner is stopped and its resources released; the waiting job starts
    cancel_job(catalog, job_id=ids[0])
    assert core.tick().admit == [ids[2]]
    assert cluster.killed == [ids[0]] and ids[0] in cluster.released
    # a running job whose runner vanished is resumed: starting again, a new runner
    jobs.transition_job(catalog, job_id=ids[1], allowed_from={"starting"}, to="running")
    cluster.alive.discard(ids[1])
    core.tick()
    resumed = jobs.get_job(catalog, job_id=ids[1])
    assert resumed.state == "starting" and resumed.attempts == 2
    assert cluster.started.count(ids[1]) == 2 and ids[1] in cluster.released
    # a job still `starting` without a runner is left alone within the grace period
    cluster.alive.discard(ids[2])
    core.tick()
    assert jobs.get_job(catalog, job_id=ids[2]).state == "starting"
    assert cluster.started.count(ids[2]) == 1
