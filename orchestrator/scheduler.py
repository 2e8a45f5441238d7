"""The scheduler: admits queued jobs, starts runners, stops cancelled ones, reconciles.

``SchedulerCore.tick`` is one pass over the catalog — all state lives there, so a scheduler
that dies and restarts loses nothing: on its first tick it finds active jobs whose runner is
gone and resumes them from their last checkpoint (``running → retrying → starting``).
``SchedulerActor`` is the thin detached, named Ray actor that calls ``tick`` in a loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.scheduling import ActiveJob, Decision, Limits, NodeFree, QueuedJob, decide
from orchestrator.service import gang_of
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.catalog.db import Catalog
from storage.settings import Settings

log = logging.getLogger(__name__)
SCHEDULER_NAME = "lorafleet-scheduler"
# A lost runner (its node died, it was killed) is not the job's fault: such attempts are
# resumed from the last checkpoint up to this many times beyond the job's own max_failures.
MAX_RUNNER_RESUMES = 3


@dataclass
class ClusterHooks:
    """How the core touches the cluster (Ray in production, fakes never needed: tests use Ray)."""

    start_runner: Callable[[str], None]
    runner_alive: Callable[[str], bool]
    kill_runner: Callable[[str], bool]
    release: Callable[[str], int]  # free what a killed run still holds (placement groups)
    nodes: Callable[[], list[NodeFree]]


class SchedulerCore:
    """One scheduling pass at a time over the catalog."""

    def __init__(self, catalog: Catalog, hooks: ClusterHooks, *, grace_s: float = 30.0) -> None:
        self.catalog = catalog
        self.hooks = hooks
        self.grace_s = grace_s  # a runner may take this long to appear after `starting`
        self._seen_starting: dict[str, float] = {}

    def _limits(self) -> dict[str, Limits]:
        return {n.name: Limits(n.max_concurrent_jobs, n.max_cpus, n.max_gpus, n.max_priority)
                for n in repo.list_namespaces(self.catalog)}  # fmt: skip

    def tick(self) -> Decision:
        """Stop cancelled runs, resume orphaned ones, admit what fits; returns the decision."""
        # 1. cancelled jobs whose runner still runs
        for job in jobs.list_jobs(self.catalog, states={"cancelled"}):
            if self.hooks.runner_alive(job.id):
                self.hooks.kill_runner(job.id)
                self.hooks.release(job.id)
                jobs.add_event(
                    self.catalog,
                    job_id=job.id,
                    kind="log",
                    data={"message": "runner stopped after cancel"},
                )
        # 2. active jobs whose runner is gone: resume from the last checkpoint
        active = jobs.list_jobs(self.catalog, states={"starting", "running", "retrying"})
        now = time.monotonic()
        for job in active:
            if self.hooks.runner_alive(job.id):
                self._seen_starting.pop(job.id, None)
                continue
            first_seen = self._seen_starting.setdefault(job.id, now)
            if job.state == "starting" and now - first_seen < self.grace_s:
                continue
            self._resume(job)
        # 3. admission
        queued = jobs.list_jobs(self.catalog, states={"queued"})
        active = jobs.list_jobs(self.catalog, states={"starting", "running", "retrying"})
        decision = decide(
            [QueuedJob(j.id, j.namespace, j.priority, j.created_at.timestamp(),
                       gang_of(j)) for j in queued],
            [ActiveJob(j.id, j.namespace, gang_of(j)) for j in active],
            self.hooks.nodes(),
            self._limits(),
        )  # fmt: skip
        for job_id in decision.admit:
            try:
                jobs.transition_job(
                    self.catalog,
                    job_id=job_id,
                    allowed_from={"queued"},
                    to="starting",
                    count_attempt=True,
                )
            except jobs.JobStateConflict:
                continue  # cancelled between the read and now
            self._seen_starting[job_id] = time.monotonic()
            self.hooks.start_runner(job_id)
        by_id = {j.id: j for j in queued}
        for job_id, reason in decision.waiting.items():
            if by_id[job_id].status_reason != reason:
                jobs.update_job(self.catalog, job_id=job_id, status_reason=reason)
        return decision

    def _resume(self, job: jobs.Job) -> None:
        """running/retrying/starting without a runner → retrying → starting, new runner."""
        if job.attempts > job.max_failures + MAX_RUNNER_RESUMES:
            jobs.transition_job(
                self.catalog,
                job_id=job.id,
                allowed_from={job.state},
                to="failed",
                error="runner lost too many times",
            )
            self.hooks.release(job.id)  # an ended job leaves no training behind
            return
        try:
            if job.state == "running":
                jobs.transition_job(
                    self.catalog,
                    job_id=job.id,
                    allowed_from={"running"},
                    to="retrying",
                    status_reason="runner lost; resuming",
                )
            if job.state in ("running", "retrying"):
                jobs.transition_job(
                    self.catalog,
                    job_id=job.id,
                    allowed_from={"retrying"},
                    to="starting",
                    count_attempt=True,
                )
        except jobs.JobStateConflict:
            return
        self.hooks.release(job.id)  # the dead run's placement group would block the new one
        log.info("resuming job %s from its last checkpoint", job.id)
        self._seen_starting[job.id] = time.monotonic()
        self.hooks.start_runner(job.id)


def ray_hooks(settings: Settings) -> ClusterHooks:
    """Cluster hooks backed by the connected Ray cluster."""
    from ray._private import state as ray_state

    from orchestrator.runner import (
        kill_runner,
        release_placement_groups,
        runner_alive,
        start_runner,
    )

    catalog = Catalog(settings.catalog_url)

    def nodes() -> list[NodeFree]:
        free = ray_state.available_resources_per_node()
        total = ray_state.total_resources_per_node()
        out = []
        for node_id, tot in total.items():
            avail = free.get(node_id, {})
            out.append(
                NodeFree(
                    avail.get("CPU", 0.0),
                    avail.get("GPU", 0.0),
                    tot.get("CPU", 0.0),
                    tot.get("GPU", 0.0),
                )
            )
        return out

    return ClusterHooks(
        start_runner=lambda job_id: start_runner(job_id, settings),
        runner_alive=runner_alive,
        kill_runner=kill_runner,
        release=lambda job_id: release_placement_groups(catalog, job_id),
        nodes=nodes,
    )


class SchedulerLoop:
    """Calls ``tick`` every ``interval_s`` in a background thread until stopped."""

    def __init__(self, core: SchedulerCore, interval_s: float = 0.5) -> None:
        self.core = core
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lorafleet-scheduler")
        self.ticks = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.core.tick()
                self.ticks += 1
            except Exception:  # a bad tick must not kill the scheduler; the next one retries
                log.exception("scheduler tick failed")
            self._stop.wait(self.interval_s)

    def start(self) -> SchedulerLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_scheduler_actor(settings: Settings, *, interval_s: float = 0.5) -> object:
    """Get or create the detached, named scheduler actor (restartable by Ray)."""
    import ray

    from orchestrator.runner import ON_HEAD, RAY_NAMESPACE
    from storage.settings import settings_for_nodes

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class SchedulerActor:
        def __init__(self, settings_json: str, interval_s: float, upgrade: bool) -> None:
            from storage.catalog.db import open_catalog
            from storage.settings import settings_on_node

            s = settings_on_node(settings_json)
            # whether the catalog is the sender's embedded one is decided where it is configured
            catalog = open_catalog(s.catalog_url, auto_upgrade=upgrade)
            self.loop = SchedulerLoop(SchedulerCore(catalog, ray_hooks(s)), interval_s).start()

        def ticks(self) -> int:
            return self.loop.ticks

    return SchedulerActor.options(  # type: ignore[attr-defined]
        name=SCHEDULER_NAME, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
        resources=ON_HEAD,
    ).remote(settings_for_nodes(settings), interval_s, settings.embedded_catalog)  # fmt: skip
