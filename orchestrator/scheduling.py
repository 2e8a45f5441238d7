"""Admission decisions: which queued jobs start now, and why the others wait (pure).

Order: higher priority first — a job's priority counts only up to its namespace's maximum,
which an admin sets (the default keeps tenants equal) — then, among equal priorities, the
namespace with the fewest active jobs (so two teams share the cluster instead of the earlier
submitter taking it all), then submission time. A job is admitted only if its whole gang fits
at once — every worker on the requested number of distinct nodes — and its namespace stays
within its limits (concurrent jobs, total CPUs, total GPUs).

A job blocked by cluster resources holds back the lower-priority jobs of its own namespace (a
team's big job is not overtaken by the same team's stream of small ones), but jobs of other
namespaces that fit start meanwhile (backfill): one team's priority never idles the cluster
for everyone. A job that can never fit the cluster waits with that reason and blocks nobody.

Packing: jobs with the same ``pack_key`` (same base, gang and micro-steps; None opts out)
train together in one worker group. A job that can join a pack with a free slot — one
admitted earlier in this decision, or one already running — does so, taking no cluster
resources of its own; it still counts against its namespace's limits as if alone, so packing
makes the cluster faster, never a team's quota larger.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Gang:
    """What a job needs: ``nodes`` nodes, each running ``workers_per_node`` workers."""

    nodes: int = 1
    workers_per_node: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def cpus(self) -> float:
        return self.nodes * self.workers_per_node * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.nodes * self.workers_per_node * self.gpus_per_worker


@dataclass(frozen=True)
class QueuedJob:
    id: str
    namespace: str
    priority: int
    submitted_at: float
    gang: Gang
    pack_key: str | None = None  # jobs with equal keys may train packed; None: alone


@dataclass(frozen=True)
class ActiveJob:
    id: str
    namespace: str
    gang: Gang
    pack: str | None = None  # the pack it runs in
    pack_key: str | None = None


@dataclass(frozen=True)
class RunningPack:
    """A pack that is running, and how many more jobs it can take at its next step."""

    id: str
    pack_key: str
    free_slots: int


@dataclass(frozen=True)
class Limits:
    """Per-namespace quota; None means unlimited."""

    max_concurrent_jobs: int | None = None
    max_cpus: float | None = None
    max_gpus: float | None = None
    max_priority: int | None = None  # a job's priority counts up to this (None: as asked)


@dataclass(frozen=True)
class NodeFree:
    """Free resources on one node now, and its total capacity."""

    cpus: float
    gpus: float = 0.0
    total_cpus: float | None = None
    total_gpus: float | None = None


@dataclass
class Decision:
    admit: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # job id → reason
    # packs started now: the job that took the resources → the jobs packed with it
    packs: dict[str, list[str]] = field(default_factory=dict)
    joins: dict[str, str] = field(default_factory=dict)  # job id → running pack it joins


def _place(gang: Gang, nodes: list[NodeFree]) -> list[int] | None:
    """Indices of ``gang.nodes`` distinct nodes that can each hold ``workers_per_node``."""
    need_c = gang.workers_per_node * gang.cpus_per_worker
    need_g = gang.workers_per_node * gang.gpus_per_worker
    fits = [i for i, n in enumerate(nodes) if n.cpus >= need_c - 1e-9 and n.gpus >= need_g - 1e-9]
    fits.sort(key=lambda i: (nodes[i].gpus, nodes[i].cpus))  # best fit: keep big nodes free
    return fits[: gang.nodes] if len(fits) >= gang.nodes else None


def _ever_fits(gang: Gang, nodes: list[NodeFree]) -> bool:
    total = [
        NodeFree(
            n.total_cpus if n.total_cpus is not None else n.cpus,
            n.total_gpus if n.total_gpus is not None else n.gpus,
        )
        for n in nodes
    ]
    return _place(gang, total) is not None


def decide(
    queued: list[QueuedJob],
    active: list[ActiveJob],
    nodes: list[NodeFree],
    limits: dict[str, Limits] | None = None,
    *,
    running_packs: Sequence[RunningPack] = (),
    max_pack: int = 8,
) -> Decision:
    """Choose the jobs to start now; give every other queued job a reason.

    Args:
        running_packs: packs that can take more jobs at their next step boundary.
        max_pack: the most jobs one pack trains (a new pack's slots).
    """
    limits = limits or {}
    # pack key → [pack id (a running pack's id, or the new pack's first job), free slots]
    open_packs: dict[str, list[Any]] = {}
    for p in running_packs:
        if p.free_slots > 0:
            open_packs.setdefault(p.pack_key, [p.id, p.free_slots, True])
    free = [NodeFree(n.cpus, n.gpus, n.total_cpus, n.total_gpus) for n in nodes]
    count = Counter(j.namespace for j in active)
    cpus: dict[str, float] = defaultdict(float)
    gpus: dict[str, float] = defaultdict(float)
    for j in active:
        cpus[j.namespace] += j.gang.cpus
        gpus[j.namespace] += j.gang.gpus
    decision = Decision()

    def rank(j: QueuedJob) -> int:
        cap = limits.get(j.namespace, Limits()).max_priority
        return j.priority if cap is None else min(j.priority, cap)

    pending = sorted(queued, key=lambda j: (-rank(j), j.submitted_at))
    blocked: dict[str, int] = {}  # namespace -> priority of its job waiting for resources
    while pending:
        top = rank(pending[0])
        same = [j for j in pending if rank(j) == top]
        job = min(same, key=lambda j: (count[j.namespace], j.submitted_at))
        pending.remove(job)
        if job.namespace in blocked and rank(job) < blocked[job.namespace]:
            decision.waiting[job.id] = (
                f"behind a higher-priority job of namespace {job.namespace} waiting for resources"
            )
            continue
        lim = limits.get(job.namespace, Limits())
        g = job.gang
        if lim.max_concurrent_jobs is not None and count[job.namespace] >= lim.max_concurrent_jobs:
            decision.waiting[job.id] = (
                f"namespace {job.namespace} is at its limit of {lim.max_concurrent_jobs} "
                "concurrent job(s)"
            )
            continue
        if lim.max_cpus is not None and cpus[job.namespace] + g.cpus > lim.max_cpus:
            decision.waiting[job.id] = (
                f"namespace {job.namespace} CPU quota: {cpus[job.namespace]:g} in use + "
                f"{g.cpus:g} > {lim.max_cpus:g}"
            )
            continue
        if lim.max_gpus is not None and gpus[job.namespace] + g.gpus > lim.max_gpus:
            decision.waiting[job.id] = (
                f"namespace {job.namespace} GPU quota: {gpus[job.namespace]:g} in use + "
                f"{g.gpus:g} > {lim.max_gpus:g}"
            )
            continue
        slot = open_packs.get(job.pack_key) if job.pack_key is not None else None
        if slot is not None:  # a pack with room: no cluster resources of its own
            pack_id, free_slots, running = slot
            if running:
                decision.joins[job.id] = pack_id
            else:
                decision.packs[pack_id].append(job.id)
            decision.admit.append(job.id)
            slot[1] = free_slots - 1
            if slot[1] == 0:
                del open_packs[job.pack_key]  # type: ignore[arg-type]
            count[job.namespace] += 1
            cpus[job.namespace] += g.cpus
            gpus[job.namespace] += g.gpus
            continue
        if not _ever_fits(g, nodes):
            decision.waiting[job.id] = (
                f"cannot fit the cluster: needs {g.nodes} node(s) with "
                f"{g.workers_per_node * g.cpus_per_worker:g} CPU and "
                f"{g.workers_per_node * g.gpus_per_worker:g} GPU each"
            )
            continue
        placement = _place(g, free)
        if placement is None:
            decision.waiting[job.id] = (
                f"waiting for resources: {g.cpus:g} CPU / {g.gpus:g} GPU as {g.nodes} × "
                f"{g.workers_per_node} workers"
            )
            blocked.setdefault(job.namespace, rank(job))
            continue
        for i in placement:
            n = free[i]
            free[i] = NodeFree(
                n.cpus - g.workers_per_node * g.cpus_per_worker,
                n.gpus - g.workers_per_node * g.gpus_per_worker,
                n.total_cpus,
                n.total_gpus,
            )
        decision.admit.append(job.id)
        if job.pack_key is not None and max_pack > 1:
            decision.packs[job.id] = []
            open_packs[job.pack_key] = [job.id, max_pack - 1, False]
        count[job.namespace] += 1
        cpus[job.namespace] += g.cpus
        gpus[job.namespace] += g.gpus
    return decision
