"""Job operations shared by the REST API, the CLI and the scheduler (plain Python, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.lifecycle import ACTIVE, STATES, TERMINAL, check_transition
from orchestrator.scheduling import Gang
from orchestrator.spec import JobSpec, ResourcesSpec, SpecError, parse_spec
from orchestrator.spec import idempotency_key as choose_key
from storage.catalog import files as file_repo
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.catalog.db import Catalog
from storage.catalog.jobs import Job
from storage.errors import NotFound


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool


def check_inputs(db: Catalog, spec: JobSpec) -> None:
    """The spec's base must be registered, its data files uploaded to its own namespace, and
    its priority within its namespace's maximum.

    Raises:
        SpecError: naming the field (another namespace's file is "not found", as if it did
            not exist).
    """
    try:
        repo.get_base_model(db, name=spec.base_model)
    except NotFound:
        raise SpecError("base_model", f"no registered base named {spec.base_model!r}") from None
    try:
        ceiling = repo.get_namespace(db, name=spec.namespace).max_priority
    except NotFound:
        ceiling = repo.DEFAULT_MAX_PRIORITY  # a namespace's first job
    if spec.priority > ceiling:
        raise SpecError("priority", f"{spec.priority} is above namespace {spec.namespace}'s "
                        f"maximum of {ceiling} (an admin sets it: lorafleet namespaces limits "
                        f"{spec.namespace} --max-priority N)")  # fmt: skip
    for field in ("training_data", "validation_data"):
        file_id = getattr(spec, field)
        if file_id is None:
            continue
        try:
            file_repo.get_file(db, file_id=file_id, namespace=spec.namespace)
        except NotFound:
            where = f"namespace {spec.namespace}"
            raise SpecError(field, f"file {file_id} not found in {where}") from None


def submit_job(db: Catalog, spec: JobSpec, *, idempotency_key: str | None = None) -> Submitted:
    """Check the spec's inputs and queue a job; the same idempotency key with the same spec
    returns the first job.

    Raises:
        SpecError: an input that is not registered/uploaded (see ``check_inputs``), or
            idempotency keys that are empty or disagree (``spec.idempotency_key``).
        IdempotencyConflict: the key was used with a different spec.
    """
    key = choose_key(idempotency_key, spec.idempotency_key)
    check_inputs(db, spec)
    job, created = jobs.create_job(
        db,
        namespace=spec.namespace,
        name=spec.name,
        spec=spec.compared(),
        priority=spec.priority,
        max_failures=spec.max_failures,
        idempotency_key=key,
    )
    return Submitted(job, created)


def cancel_job(db: Catalog, *, job_id: str, namespace: str | None = None) -> Job:
    """Mark a job cancelled (the scheduler stops its runner within a tick). Idempotent.

    Raises:
        JobNotFound; JobStateConflict if the job already succeeded or failed.
    """
    job = jobs.get_job(db, job_id=job_id, namespace=namespace)
    if job.state == "cancelled":
        return job
    check_transition(job.id, job.state, "cancelled")
    allowed = [s for s in STATES if s not in TERMINAL]
    return jobs.transition_job(db, job_id=job.id, allowed_from=allowed, to="cancelled")


def job_spec(job: Job) -> JobSpec:
    """The validated spec stored with a job."""
    return parse_spec(job.spec)


def gang_of(job: Job) -> Gang:
    """What a job needs at once, from its spec's ``resources`` alone.

    Only that part is parsed: a job stored under an older spec rule (a path where a file id
    now belongs) must not stop the scheduler; its runner fails it with the reason.
    """
    r = ResourcesSpec.model_validate(job.spec.get("resources") or {})
    return Gang(r.nodes, r.workers_per_node, r.cpus_per_worker, r.gpus_per_worker)


PACK_MAX_TOKENS_PER_JOB = 16_384  # batch_size × seq_len of one micro-step, to train packed


def pack_key_of(job: Job, base_fingerprint: str) -> str | None:
    """The key of the packs a job may train in, or None when it trains alone.

    Jobs pack when they share the base (its content fingerprint), the gang (one worker group
    runs them all), ``grad_accum`` (micro-steps are shared) and ``max_failures`` (the group's
    restarts are shared). Rank, alpha, targets, lr, batch, seq_len and data may all differ.
    Only plain LoRA on an unquantized base packs: the packed layer has no DoRA magnitude and
    shares one full-precision base, so a DoRA or QLoRA job trains alone. A pack holds one
    namespace's jobs, and a job whose micro-step holds more than ``PACK_MAX_TOKENS_PER_JOB``
    tokens trains alone: one member cannot take the memory of a pack it shares.
    """
    if job.spec.get("packing", True) is False:
        return None
    if job.spec.get("init_adapter"):  # a warm start trains alone (its config is the adapter's)
        return None
    lora = job.spec.get("lora") or {}
    variant = lora.get("variant", lora.get("method", "lora"))  # lora.method: the old spelling
    if variant != "lora" or lora.get("base_quantization", "none") != "none":
        return None
    training = job.spec.get("training") or {}
    tokens = int(training.get("batch_size", 16)) * int(training.get("seq_len", 128))
    if tokens > PACK_MAX_TOKENS_PER_JOB:  # it would take the pack's memory: alone
        return None
    g = gang_of(job)
    accum = training.get("grad_accum", 1)
    # a pack holds one namespace's jobs: a member's failure or load never reaches another team
    return (f"{base_fingerprint}|{g.nodes}x{g.workers_per_node}|cpu{g.cpus_per_worker:g}|"
            f"gpu{g.gpus_per_worker:g}|accum{accum}|fail{job.max_failures}|"
            f"ns:{job.namespace}")  # fmt: skip


def active_jobs(db: Catalog) -> list[Job]:
    return jobs.list_jobs(db, states=ACTIVE)
