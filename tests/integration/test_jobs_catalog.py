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
    deleted = files.delete_file(catalog, file_id=other.id, namespace="blue")
    assert deleted.id == other.id
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


class _FakePackCluster(_FakeCluster):
    """As ``_FakeCluster``, with pack runners: a pack takes one slot whatever its size."""

    def __init__(self) -> None:
        super().__init__()
        self.packs: set[str] = set()
        self.packs_started: list[str] = []

    def hooks(self):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        from orchestrator.scheduling import NodeFree

        def start_pack(pack_id: str) -> None:
            self.packs_started.append(pack_id)
            self.packs.add(pack_id)

        free = lambda: [NodeFree(cpus=2 - len(self.alive) - len(self.packs), total_cpus=2)]  # noqa: E731
        return replace(super().hooks(), nodes=free, start_pack=start_pack,
                       pack_alive=self.packs.__contains__)  # fmt: skip


def _packable(name: str, **training: object) -> dict[str, object]:
    return {"name": name, "namespace": "team", "base_model": "tiny",
            "training": {"lr": 0.001, **training}}  # fmt: skip


def test_scheduler_packs_joins_and_resumes_a_lost_pack_alone(catalog):
    """Jobs on one base start as one pack; a later one joins it; an opted-out or differently
    accumulating job trains alone; a cancelled member is left to its pack; a pack whose
    runner is gone has its jobs resumed alone."""
    from orchestrator.scheduler import SchedulerCore
    from orchestrator.service import cancel_job
    from storage.catalog import packs
    from storage.catalog import repository as repo

    repo.register_base_model(catalog, name="tiny", source="test", architecture="Llama",
                             parameter_count=1, fingerprint="f" * 64)  # fmt: skip
    cluster = _FakePackCluster()
    core = SchedulerCore(catalog, cluster.hooks(), grace_s=3600, max_pack=3)

    def make(spec: dict[str, object]) -> str:
        return jobs.create_job(catalog, namespace="team", name=str(spec["name"]), spec=spec)[0].id

    a, b = make(_packable("a")), make(_packable("b"))
    alone = make({**_packable("alone"), "packing": False})
    other = make(_packable("other", grad_accum=2))  # micro-steps differ: a pack of its own key
    decision = core.tick()
    assert decision.packs[a] == [b] and len(cluster.packs_started) == 1
    assert cluster.started == [alone]  # the pack took one slot, `alone` the other
    assert other in decision.waiting
    pack_id = cluster.packs_started[0]
    assert {jobs.get_job(catalog, job_id=j).pack_id for j in (a, b)} == {pack_id}
    assert jobs.get_job(catalog, job_id=alone).pack_id is None
    # a job queued while the pack runs joins it (no resources of its own) until it is full
    c, d = make(_packable("c")), make(_packable("d"))
    decision = core.tick()
    assert decision.joins == {c: pack_id} and d in decision.waiting
    assert packs.get_pack(catalog, pack_id=pack_id).jobs == (a, b, c)
    assert jobs.get_job(catalog, job_id=c).state == "starting"
    # a cancelled member is not killed (its pack drops it at the next step), and its slot
    # is free again at once: d joins
    cancel_job(catalog, job_id=b)
    assert core.tick().joins == {d: pack_id}
    assert cluster.killed == [] and pack_id in cluster.packs
    assert packs.get_pack(catalog, pack_id=pack_id).jobs == (a, c, d)
    # the pack's runner dies: its jobs are resumed alone, each from its own checkpoint
    for job_id in (a, c, d):
        jobs.transition_job(catalog, job_id=job_id, allowed_from={"starting"}, to="running")
    cluster.packs.discard(pack_id)
    core.tick()
    for job_id in (a, c, d):
        resumed = jobs.get_job(catalog, job_id=job_id)
        assert resumed.state == "starting" and resumed.pack_id is None
        assert job_id in cluster.started and job_id in cluster.released
    assert packs.get_pack(catalog, pack_id=pack_id).state == "closed"


def test_a_closed_pack_takes_no_joiner_and_a_full_one_none_beyond_its_slots(catalog):
    from storage.catalog import packs

    ids = [jobs.create_job(catalog, namespace="team", name=f"j{i}", spec=SPEC)[0].id
           for i in range(4)]  # fmt: skip
    pack, entered = packs.start_pack(catalog, pack_key="k", max_slots=2, job_ids=ids[:1])
    assert entered == ids[:1] and pack.free_slots == 1
    packs.join_pack(catalog, job_id=ids[1], pack_id=pack.id)
    with pytest.raises(packs.PackUnavailable, match="full"):
        packs.join_pack(catalog, job_id=ids[2], pack_id=pack.id)
    assert jobs.get_job(catalog, job_id=ids[2]).state == "queued"  # nothing changed
    jobs.transition_job(catalog, job_id=ids[1], allowed_from={"starting"}, to="cancelled")
    packs.close_pack(catalog, pack_id=pack.id)
    with pytest.raises(packs.PackUnavailable, match="closed"):
        packs.join_pack(catalog, job_id=ids[2], pack_id=pack.id)
    assert packs.list_packs(catalog, states={"open"}) == []
    # joins racing a close: each join either lands before the close (and is then a member
    # the runner reads after closing) or is refused; none lands after
    pack, _ = packs.start_pack(catalog, pack_key="k", max_slots=8, job_ids=ids[:1])
    racers = [jobs.create_job(catalog, namespace="team", name=f"r{i}", spec=SPEC)[0].id
              for i in range(4)]  # fmt: skip
    tasks = [lambda: packs.close_pack(catalog, pack_id=pack.id)] + [
        (lambda j=j: _join_or_refused(packs, catalog, j, pack.id)) for j in racers
    ]
    outcomes, errors = _run_threads(5, lambda: tasks.pop()())  # list.pop is atomic
    assert not errors
    members = set(packs.get_pack(catalog, pack_id=pack.id).jobs)
    joined = {j for j in outcomes if isinstance(j, str)}
    assert joined <= members and packs.get_pack(catalog, pack_id=pack.id).state == "closed"
    with pytest.raises(packs.PackUnavailable):
        packs.join_pack(catalog, job_id=ids[3], pack_id=pack.id)


def _join_or_refused(packs, catalog, job_id, pack_id):  # type: ignore[no-untyped-def]
    try:
        return packs.join_pack(catalog, job_id=job_id, pack_id=pack_id).id
    except packs.PackUnavailable:
        return None
