"""The scheduler: admits queued jobs, starts runners, stops cancelled ones, reconciles.

``SchedulerCore.tick`` is one pass over the catalog — all state lives there, so a scheduler
that dies and restarts loses nothing: on its first tick it finds active jobs whose runner is
gone and resumes them from their last checkpoint (``running → retrying → starting``).
``SchedulerActor`` is the thin detached, named Ray actor that calls ``tick`` in a loop.

Packs (``orchestrator.scheduling``): jobs admitted together with the same pack key start as
one pack with one runner; a queued job joins an open pack with a free slot, and that pack's
runner takes it in at its next step boundary. A packed job's runner is its pack's: a cancelled
packed job leaves at the pack's next step (the pack runner reads the catalog), and a packed job
whose pack runner is gone is resumed alone from its own last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.scheduling import (
    ActiveJob,
    Decision,
    Limits,
    NodeFree,
    QueuedJob,
    RunningPack,
    decide,
)
from orchestrator.service import gang_of, pack_key_of
from storage.catalog import jobs, packs
from storage.catalog import repository as repo
from storage.catalog.db import Catalog
from storage.errors import NotFound
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
    start_pack: Callable[[str], None] | None = None  # a pack's runner, by pack id
    pack_alive: Callable[[str], bool] | None = None  # (None: this cluster never packs)


class SchedulerCore:
    """One scheduling pass at a time over the catalog."""

    def __init__(
        self, catalog: Catalog, hooks: ClusterHooks, *, grace_s: float = 30.0, max_pack: int = 8
    ) -> None:
        self.catalog = catalog
        self.hooks = hooks
        self.grace_s = grace_s  # a runner may take this long to appear after `starting`
        self.max_pack = max_pack  # the most jobs one pack trains
        self._seen_starting: dict[str, float] = {}

    @property
    def packs(self) -> bool:
        return self.hooks.start_pack is not None and self.hooks.pack_alive is not None

    def _runner_alive(self, job: jobs.Job) -> bool:
        if job.pack_id is not None and self.hooks.pack_alive is not None:
            return self.hooks.pack_alive(job.pack_id)
        return self.hooks.runner_alive(job.id)

    def _pack_keys(self, queued: list[jobs.Job]) -> dict[str, str | None]:
        """Each queued job's pack key (None: alone; so is a job whose base is gone — its
        runner fails it with the reason)."""
        if not self.packs:
            return {j.id: None for j in queued}
        fingerprints: dict[str, str | None] = {}
        out: dict[str, str | None] = {}
        for j in queued:
            base = j.spec.get("base_model")
            if not isinstance(base, str):
                out[j.id] = None
                continue
            if base not in fingerprints:
                try:
                    fingerprints[base] = repo.get_base_model(self.catalog, name=base).fingerprint
                except NotFound:
                    fingerprints[base] = None
            fp = fingerprints[base]
            out[j.id] = pack_key_of(j, fp) if fp is not None else None
        return out

    def _running_packs(self) -> list[RunningPack]:
        if not self.packs:
            return []
        assert self.hooks.pack_alive is not None
        return [RunningPack(p.id, p.pack_key, p.free_slots)
                for p in packs.list_packs(self.catalog, states={"open"})
                if p.free_slots > 0 and p.jobs and self.hooks.pack_alive(p.id)]  # fmt: skip

    def _limits(self) -> dict[str, Limits]:
        return {n.name: Limits(n.max_concurrent_jobs, n.max_cpus, n.max_gpus, n.max_priority)
                for n in repo.list_namespaces(self.catalog)}  # fmt: skip

    def tick(self) -> Decision:
        """Stop cancelled runs, resume orphaned ones, admit what fits; returns the decision."""
        # 1. cancelled jobs whose runner still runs
        for job in _scheduled(jobs.list_jobs(self.catalog, states={"cancelled"})):
            if job.pack_id is not None and self.packs:
                continue  # its pack drops it at the next step; the others train on
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
        active = _scheduled(jobs.list_jobs(self.catalog, states={"starting", "running",
                                                                 "retrying"}))  # fmt: skip
        now = time.monotonic()
        for job in active:
            if self._runner_alive(job):
                self._seen_starting.pop(job.id, None)
                continue
            first_seen = self._seen_starting.setdefault(job.id, now)
            if job.state == "starting" and now - first_seen < self.grace_s:
                continue
            self._resume(job)
        # 3. admission
        queued = jobs.list_jobs(self.catalog, states={"queued"})
        active = _scheduled(jobs.list_jobs(self.catalog, states={"starting", "running",
                                                                 "retrying"}))  # fmt: skip
        keys = self._pack_keys(queued)
        decision = decide(
            [QueuedJob(j.id, j.namespace, j.priority, j.created_at.timestamp(),
                       gang_of(j), keys[j.id]) for j in queued],
            [ActiveJob(j.id, j.namespace, gang_of(j), j.pack_id) for j in active],
            self.hooks.nodes(),
            self._limits(),
            running_packs=self._running_packs(),
            max_pack=self.max_pack,
        )  # fmt: skip
        self._apply(decision, keys)
        by_id = {j.id: j for j in queued}
        for job_id, reason in decision.waiting.items():
            if by_id[job_id].status_reason != reason:
                jobs.update_job(self.catalog, job_id=job_id, status_reason=reason)
        return decision

    def _apply(self, decision: Decision, keys: dict[str, str | None]) -> None:
        """Start what the decision admitted: packs, joins, and jobs alone."""
        packed = {j for members in decision.packs.values() if members for j in members}
        for leader, members in decision.packs.items():
            if not members:
                continue  # a pack of one trains alone (below)
            key = keys[leader]
            assert key is not None and self.hooks.start_pack is not None
            pack, entered = packs.start_pack(self.catalog, pack_key=key, max_slots=self.max_pack,
                                             job_ids=[leader, *members])  # fmt: skip
            packed.add(leader)
            now = time.monotonic()
            for job_id in entered:
                self._seen_starting[job_id] = now
            if entered:
                log.info("pack %s: starting %d jobs", pack.id, len(entered))
                self.hooks.start_pack(pack.id)
            else:
                packs.close_pack(self.catalog, pack_id=pack.id)  # all cancelled meanwhile
        for job_id, pack_id in decision.joins.items():
            try:
                packs.join_pack(self.catalog, job_id=job_id, pack_id=pack_id)
            except (packs.PackUnavailable, packs.PackNotFound, jobs.JobStateConflict):
                continue  # closed or filled meanwhile, or cancelled: the next tick decides
            self._seen_starting[job_id] = time.monotonic()
        for job_id in decision.admit:
            if job_id in packed or job_id in decision.joins:
                continue
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
        if job.pack_id is not None:  # its pack's runner is gone: it goes on alone
            packs.close_pack(self.catalog, pack_id=job.pack_id)
            packs.leave_pack(self.catalog, job_id=job.id)
        log.info("resuming job %s from its last checkpoint", job.id)
        self._seen_starting[job.id] = time.monotonic()
        self.hooks.start_runner(job.id)


def _scheduled(found: list[jobs.Job]) -> list[jobs.Job]:
    """The jobs this scheduler runs: a Tinker session's job belongs to the API server that
    holds the session (it ends it), and takes no Ray resources."""
    return [j for j in found if j.spec.get("kind") != "tinker"]


def ray_hooks(settings: Settings) -> ClusterHooks:
    """Cluster hooks backed by the connected Ray cluster."""
    from ray._private import state as ray_state

    from orchestrator.pack_runner import pack_alive, start_pack_runner
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
        start_pack=lambda pack_id: start_pack_runner(pack_id, settings),
        pack_alive=pack_alive,
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
