"""Run one pack: every job's lifecycle around one shared worker group.

``PackRun`` is plain Python: it owns the pack's membership — jobs the scheduler moved into the
pack (``starting``) come in, cancelled ones go out — and ends each job as the workers hand it
back: published through ``finish_job`` as a lone job is, or failed with its own reason. The
workers' rank 0 calls ``sync`` at every step boundary. When no job is left, ``sync`` closes the
pack in the catalog *before* it reads the members one last time, so a job the scheduler let in
just before the close still trains, and none can join after it.

``start_pack_runner`` wraps it in the thin detached Ray actor (named after the pack) whose
``sync`` the workers call while its ``run`` drives the group.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from orchestrator.job_errors import DETAIL_EVENT
from orchestrator.runner import (
    ON_HEAD,
    RAY_NAMESPACE,
    _through_outage,
    actor_alive,
    build_distributed_spec,
    fail_job,
    finish_job,
)
from storage.catalog import jobs, packs
from storage.errors import StorageError
from storage.registry import Registry
from storage.settings import Settings, settings_for_nodes, settings_on_node
from storage.staging import checkpoint_root
from workers.errors import WorkerError
from workers.training.distributed_spec import DistributedSpec, PackSpec
from workers.training.ray_train import fetch_result, train_pack

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often the runner looks for joiners, cancellations and results


def pack_runner_name(pack_id: str) -> str:
    return f"lorafleet-pack-{pack_id}"


class PackRun:
    """The catalog side of one pack (thread-safe: ``sync`` comes from the workers' calls).

    Args:
        pack_id: the pack (its jobs were moved into it by the scheduler).
        settings: this node's settings.
        poll_s: how often ``run`` looks at the catalog.
    """

    def __init__(self, pack_id: str, settings: Settings, *, poll_s: float = POLL_S) -> None:
        self.pack_id = pack_id
        self.settings = settings
        self.registry = Registry.from_settings(settings)
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self.members: dict[str, DistributedSpec] = {}  # training now, as the workers see them
        self._jobs: dict[str, jobs.Job] = {}  # every job taken in, and its run
        self._specs: dict[str, DistributedSpec] = {}
        self._ended: dict[str, dict[str, Any]] = {}  # handed back, not yet published/failed
        self.pack_spec: PackSpec | None = None
        # lineage, kept here so a restarted worker group loses none of it: the jobs each job
        # trained alongside, and the most it shared a pack with (itself included)
        self.packed_with: dict[str, set[str]] = {}
        self.most_jobs: dict[str, int] = {}

    # -- membership ------------------------------------------------------------------------
    def admit(self) -> list[str]:
        """Take in the pack's ``starting`` jobs (→ running); a job whose inputs are gone fails
        alone. Returns the ids taken in."""
        db = self.registry.catalog
        taken = []
        with self._lock:
            waiting = _through_outage(
                lambda: packs.pack_jobs(db, pack_id=self.pack_id, states={"starting"}),
                "reading the pack",
            )
            for job in waiting:
                if job.id in self.members:
                    continue
                try:
                    dspec = build_distributed_spec(job, self.settings, self.registry)
                    jobs.transition_job(db, job_id=job.id, allowed_from={"starting"}, to="running")
                except jobs.JobStateConflict:
                    continue  # cancelled meanwhile
                except (WorkerError, StorageError, ValueError) as exc:
                    fail_job(db, job.id, str(exc))
                    continue
                jobs.update_job(db, job_id=job.id, checkpoint_uri=f"{self.settings.object_store}/"
                                f"{checkpoint_root(job.id)}")  # fmt: skip
                self.members[job.id] = dspec
                self._jobs[job.id], self._specs[job.id] = job, dspec
                taken.append(job.id)
                if self.pack_spec is None:
                    self.pack_spec = _pack_spec(self.pack_id, dspec, self.settings)
        return taken

    def drop_cancelled(self) -> list[str]:
        """Members cancelled in the catalog leave at the workers' next step boundary."""
        db = self.registry.catalog
        with self._lock:
            ids = list(self.members)
        if not ids:
            return []
        gone = [j.id for j in _through_outage(
            lambda: packs.pack_jobs(db, pack_id=self.pack_id, states={"cancelled"}),
            "reading the pack") if j.id in ids]  # fmt: skip
        with self._lock:
            for job_id in gone:
                self.members.pop(job_id, None)
                log.info("pack %s: job %s cancelled; it leaves the pack", self.pack_id, job_id)
        return gone

    def sync(self, ended: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Rank 0's call at a step boundary: take the jobs that ended, give the members of now.

        With no member left the pack closes first and is read once more, so a job that
        joined before the close is still trained (and none joins after it).
        """
        with self._lock:
            for job_id, outcome in ended.items():
                self._ended[job_id] = outcome
                self.members.pop(job_id, None)
            if not self.members:
                _through_outage(
                    lambda: packs.close_pack(self.registry.catalog, pack_id=self.pack_id),
                    "closing the pack",
                )
                self.admit()
            for job_id in self.members:
                self.packed_with.setdefault(job_id, set()).update(set(self.members) - {job_id})
                self.most_jobs[job_id] = max(self.most_jobs.get(job_id, 1), len(self.members))
            return {j: d.to_dict() for j, d in self.members.items()}

    # -- results ---------------------------------------------------------------------------
    def settle(self) -> None:
        """Publish or fail the jobs the workers handed back (outside the lock: uploads)."""
        with self._lock:
            ended, self._ended = self._ended, {}
        db = self.registry.catalog
        for job_id, outcome in ended.items():
            job = self._jobs[job_id]
            if not outcome.get("ok"):
                fail_job(db, job_id, str(outcome.get("error", "failed in its pack")))
                continue
            dspec = self._specs[job_id]
            try:
                result = fetch_result(dspec)
            except StorageError as exc:
                fail_job(db, job_id, f"its adapter could not be fetched: {exc}")
                continue
            with_ = sorted(self.packed_with.get(job_id, ()))
            most = self.most_jobs.get(job_id, 1)
            result.metrics["pack"] = {"id": self.pack_id, "jobs": most, "packed_with": with_}
            state = finish_job(self.registry, job, dspec, result)
            log.info("pack %s: job %s %s", self.pack_id, job_id, state)

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> None:
        """Train the pack until its last job has left; every job ends in a terminal state."""
        db = self.registry.catalog
        self.admit()
        if self.pack_spec is None:
            packs.close_pack(db, pack_id=self.pack_id)
            return
        error: list[BaseException] = []
        spec = self.pack_spec

        def fit() -> None:
            try:
                train_pack(spec)
            except BaseException as exc:  # handed to the loop below, which fails the members
                error.append(exc)

        group = threading.Thread(target=fit, name=f"pack-{self.pack_id}", daemon=True)
        group.start()
        while group.is_alive():
            self.drop_cancelled()
            self.admit()
            self.settle()
            group.join(self.poll_s)
        _through_outage(lambda: packs.close_pack(db, pack_id=self.pack_id), "closing the pack")
        self.settle()
        reason = f"{error[0]}" if error else "its pack's workers stopped before it finished"
        with self._lock:
            left, self.members = list(self.members), {}
        waiting = packs.pack_jobs(db, pack_id=self.pack_id, states={"starting"})
        # The group failed as a whole (its restarts spent): which member caused it is not
        # known, so each goes on alone from its own checkpoint — the culprit fails alone
        # then, the others finish (the scheduler resumes a job that has no runner).
        for job_id in [*left, *(j.id for j in waiting)]:
            retry_alone(db, job_id, reason)


def retry_alone(db: Any, job_id: str, reason: str) -> None:
    """Take a job out of its failed pack and back to ``retrying``: the scheduler resumes it
    alone from its checkpoint (a cancel that came first stands)."""
    log.warning("job %s: its pack failed (%s); it is retried alone", job_id, reason)
    packs.leave_pack(db, job_id=job_id)
    with contextlib.suppress(jobs.JobStateConflict):
        jobs.transition_job(
            db,
            job_id=job_id,
            allowed_from={"starting", "running"},
            to="retrying",
            status_reason="its pack failed; retried alone",
        )
    jobs.add_event(db, job_id=job_id, kind="pack_failed", data={"retried": "alone"})
    jobs.add_event(db, job_id=job_id, kind=DETAIL_EVENT, data={"detail": reason})


def _pack_spec(pack_id: str, first: DistributedSpec, settings: Settings) -> PackSpec:
    """The worker group of a pack, from its first job (pack keys make the others agree)."""
    assert first.base is not None
    return PackSpec(
        pack_id=pack_id,
        base=first.base,
        store=first.store,
        storage_path=first.storage_path,
        control={"name": pack_runner_name(pack_id), "namespace": RAY_NAMESPACE},
        workers=first.workers,
        nodes=first.nodes,
        cpus_per_worker=first.cpus_per_worker,
        use_gpu=first.use_gpu,
        max_failures=first.max_failures,
        threads_per_worker=first.threads_per_worker,
    )


def start_pack_runner(pack_id: str, settings: Settings) -> None:
    """Start the detached runner actor of a pack (no CPU of its own: its workers have)."""
    import ray

    # threaded: rank 0's ``sync`` calls arrive while ``run`` drives the group
    @ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)  # type: ignore[call-overload]
    class PackRunner:
        def __init__(self, pack_id: str, settings_json: str) -> None:
            self.pack = PackRun(pack_id, settings_on_node(settings_json))

        def run(self) -> None:
            try:
                self.pack.run()
            except Exception:
                log.exception("pack %s: runner failed", self.pack.pack_id)
                raise
            finally:
                ray.actor.exit_actor()

        def sync(self, ended: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            return self.pack.sync(ended)

    actor = PackRunner.options(  # type: ignore[attr-defined]
        name=pack_runner_name(pack_id), namespace=RAY_NAMESPACE, lifetime="detached",
        resources=ON_HEAD,
    ).remote(pack_id, settings_for_nodes(settings))  # fmt: skip
    actor.run.remote()


def pack_alive(pack_id: str) -> bool:
    """Whether the pack's runner actor exists."""
    return actor_alive(pack_runner_name(pack_id))
