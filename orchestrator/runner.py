"""Run one admitted job: train on Ray Train, record events, publish the adapter with lineage.

``run_job`` is plain Python; ``JobRunner`` is the thin Ray actor the scheduler starts for it
(detached and named after the job, so a restarted scheduler can find it or see it is gone).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from orchestrator.job_errors import DETAIL_EVENT, public_failure
from orchestrator.service import job_spec
from orchestrator.spec import JobSpec
from orchestrator.spectra import spectrum_metrics, spectrum_of_dir
from orchestrator.training_configs import lora_config, train_config
from storage.catalog import files as file_repo
from storage.catalog import jobs
from storage.errors import CatalogUnavailable, StorageError
from storage.registry import Registry
from storage.retry import with_retries
from storage.settings import Settings, mask_url, settings_for_nodes, settings_on_node
from storage.staging import checkpoint_root, remove_staged
from workers.errors import WorkerError
from workers.training.distributed_spec import DistributedSpec
from workers.training.ray_train import DistributedResult, train_distributed

log = logging.getLogger(__name__)
T = TypeVar("T")
RAY_NAMESPACE = "lorafleet"


# The control plane lives on the head node. A runner there survives the loss of any worker
# node, so that loss has one owner — Ray Train's FailureConfig restarting the worker group —
# and the scheduler resumes a job only when its runner itself is gone.
ON_HEAD = {"node:__internal_head__": 0.001}


def runner_name(job_id: str) -> str:
    return f"lorafleet-runner-{job_id}"


def build_distributed_spec(
    job: jobs.Job, settings: Settings, registry: Registry
) -> DistributedSpec:
    """Translate a job into the distributed training run of its current attempt.

    Only catalog records travel: every node fetches the base and the data files from the
    object store into its own verified cache.
    """
    spec = job_spec(job)
    base = registry.base(spec.base_model)
    data = file_repo.get_file(registry.catalog, file_id=spec.training_data,
                              namespace=spec.namespace)  # fmt: skip
    evald = (
        file_repo.get_file(registry.catalog, file_id=spec.validation_data, namespace=spec.namespace)
        if spec.validation_data
        else None
    )
    train = train_config(spec.training, n_rows=data.rows, workers=spec.resources.workers)
    lora = lora_config(spec.lora, max_steps=train.max_steps)
    init = None
    if spec.init_adapter is not None:  # a warm start: the starting adapter's own config
        from workers.lora.io import read_adapter_config

        version, init_dir = registry.fetch(spec.init_adapter)  # this node's verified copy
        if version.base_model.fingerprint != base.fingerprint:
            raise WorkerError(f"init_adapter {version.ref} was trained on base "
                              f"{version.base_model.name}, not {spec.base_model}")  # fmt: skip
        lora = read_adapter_config(init_dir)
        init = asdict(version) | {"created_at": None}
    graders = {}
    for ref in sorted(spec_grader_models(spec)):  # a score_model grader's adapters
        version = registry.resolve(ref)
        if version.base_model.fingerprint != base.fingerprint:
            raise WorkerError(f"the grader's model {version.ref} was trained on base "
                              f"{version.base_model.name}, not {spec.base_model}")  # fmt: skip
        graders[ref] = asdict(version) | {"created_at": None}
    return DistributedSpec(
        job_name=f"{job.id}-a{job.attempts}",
        base=asdict(base),
        data_file=asdict(data) | {"created_at": None},
        eval_file=asdict(evald) | {"created_at": None} if evald else None,
        store={"uri": settings.object_store, "s3_endpoint": settings.s3_endpoint},
        checkpoint_key=job.id,
        out_dir=str(settings.home / "jobs" / job.id / f"attempt-{job.attempts}"),
        storage_path=str(settings.home / "ray_results"),
        lora=lora,
        train=train,
        method=spec.method.as_dict(),
        init_adapter=init,
        grader_adapters=graders,
        workers=spec.resources.workers,
        nodes=spec.resources.nodes,
        cpus_per_worker=spec.resources.cpus_per_worker,
        use_gpu=spec.resources.gpus_per_worker > 0,
        checkpoint_every=spec.training.checkpoint_every,
        max_failures=spec.max_failures,
        event_sink={"catalog_url": mask_url(settings.catalog_url), "job_id": job.id},
    )  # fmt: skip


def run_job(job_id: str, settings: Settings) -> str:
    """Drive one job from ``starting`` to a terminal state; returns that state.

    Every failure ends the job with its reason — training, a missing input, or a publish the
    store or catalog refused — rather than escaping as a lost runner (which the scheduler
    would retrain).
    """
    registry = Registry.from_settings(settings)
    db = registry.catalog
    job = jobs.get_job(db, job_id=job_id)
    try:
        dspec = build_distributed_spec(job, settings, registry)
        jobs.transition_job(db, job_id=job_id, allowed_from={"starting"}, to="running")
        jobs.update_job(db, job_id=job_id, checkpoint_uri=f"{settings.object_store}/"
                        f"{checkpoint_root(job_id)}")  # fmt: skip
        result = train_distributed(dspec)
    except (WorkerError, StorageError, ValueError) as exc:
        return fail_job(db, job_id, str(exc), exc)
    except Exception as exc:  # anything else fails the job too, with its reason: a runner
        # that died instead would be retried by the scheduler, and a bad spec retried fails
        # the same way again
        log.exception("job %s: unexpected error", job_id)
        return fail_job(db, job_id, f"{type(exc).__name__}: {exc}", exc)
    return finish_job(registry, job, dspec, result)


def finish_job(
    registry: Registry, job: jobs.Job, dspec: DistributedSpec, result: DistributedResult
) -> str:
    """Publish a trained job's adapter with its lineage and end the job; returns its state.

    A job cancelled meanwhile publishes nothing; a publish the store or catalog refuses fails
    the job (the adapter stays staged). Alone or packed, every job ends here.
    """
    db, job_id = registry.catalog, job.id
    try:
        # the catalog may be restarting as training ends: wait for it rather than fail the job
        current = _through_outage(lambda: jobs.get_job(db, job_id=job_id), "reading the job")
        if current.state != "running":  # cancelled meanwhile: publish nothing
            return current.state
        spec = job_spec(job)
        metrics = {k: v for k, v in result.metrics.items() if k not in ("workers", "curve")}
        if metrics.get("eval_loss_final") is not None:  # the name gates and filters use
            metrics.setdefault("eval_loss", metrics["eval_loss_final"])
        spectrum = spectrum_of_dir(result.adapter_dir)
        metrics.update(spectrum_metrics(spectrum))
        version = registry.publish(
            adapter_dir=result.adapter_dir,
            ref=spec.output_adapter,
            base_model=spec.base_model,
            job_id=job_id,
            dataset_sha256=result.metrics.get("dataset_sha256"),
            metrics=metrics,
            hyperparameters={
                "method": spec.method.as_dict(),
                "init_adapter": _init_ref(dspec),  # a warm start's lineage: the exact version
                "lora": spec.lora.model_dump(mode="json"),
                "training": asdict(dspec.train),
                "resources": spec.resources.model_dump(mode="json"),
                "data": {
                    "training_file": spec.training_data,
                    "validation_file": spec.validation_data,
                },
            },
            tags=spec.tags,
            created_by=f"job:{job_id}",
            spectrum=spectrum,
        )
    except Exception as exc:
        # the trained adapter stays staged in the object store (staging/<run>/)
        return fail_job(db, job_id, f"publish failed: {exc}", exc)
    finally:
        shutil.rmtree(result.adapter_dir, ignore_errors=True)
    remove_staged(registry.store, dspec.staging_prefix)  # published: the copy can go
    ref = version.ref
    _through_outage(
        lambda: jobs.add_event(db, job_id=job_id, kind="adapter", data={"ref": ref}),
        "recording the adapter",
    )
    _through_outage(
        lambda: jobs.transition_job(db, job_id=job_id, allowed_from={"running"}, to="succeeded"),
        "finishing the job",
    )
    return "succeeded"


def spec_grader_models(spec: JobSpec) -> set[str]:
    """The adapters a reinforcement job's score_model grader asks (the base excluded)."""
    if spec.method.reinforcement is None:
        return set()
    from workers.training.graders import BASE_MODEL, parse_grader

    return set(parse_grader(spec.method.reinforcement.grader).models) - {BASE_MODEL}


def _init_ref(dspec: DistributedSpec) -> str | None:
    """``namespace/name:version`` of the adapter a warm start began from (None: fresh)."""
    d = dspec.init_adapter
    return None if d is None else f"{d['namespace']}/{d['name']}:{d['version']}"


CATALOG_OUTAGE_S = 300.0  # how long a runner waits out a catalog outage before giving up


def _through_outage(fn: Callable[[], T], what: str) -> T:
    return with_retries(fn, retry_on=(CatalogUnavailable,), deadline_s=CATALOG_OUTAGE_S, what=what)


def fail_job(db: Any, job_id: str, message: str, exc: BaseException | None = None) -> str:
    """End an active job as failed (a cancel that came first stands). Its ``error`` is
    ``message`` made public (``job_errors``: no store URIs, hosts or paths); the full text
    goes to the log and, when they differ, to an admin-only event."""
    log.warning("job %s failed: %s", job_id, message)
    public = public_failure(message, exc)
    if public != message:
        _through_outage(lambda: jobs.add_event(db, job_id=job_id, kind=DETAIL_EVENT,
                                               data={"detail": message}),
                        "recording the failure's detail")  # fmt: skip
    with contextlib.suppress(jobs.JobStateConflict):  # cancelled meanwhile: that stands
        _through_outage(lambda: jobs.transition_job(
            db, job_id=job_id, allowed_from={"starting", "running", "retrying"}, to="failed",
            error=public,
        ), "failing the job")  # fmt: skip
    return _through_outage(lambda: jobs.get_job(db, job_id=job_id), "reading the job").state


def start_runner(job_id: str, settings: Settings) -> None:
    """Start the detached runner actor of a job (no CPU of its own: Ray Train's workers have)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class JobRunner:
        def run(self, job_id: str, settings_json: str) -> str:
            try:
                return run_job(job_id, settings_on_node(settings_json))
            finally:
                ray.actor.exit_actor()

    actor = JobRunner.options(  # type: ignore[attr-defined]
        name=runner_name(job_id), namespace=RAY_NAMESPACE, lifetime="detached",
        resources=ON_HEAD,
    ).remote()  # fmt: skip
    actor.run.remote(job_id, settings_for_nodes(settings))


def actor_alive(name: str) -> bool:
    """Whether the named detached actor of the control plane exists (judged from Ray's own
    state, never from a timed-out call)."""
    import ray

    try:
        ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    return True


def runner_alive(job_id: str) -> bool:
    return actor_alive(runner_name(job_id))


def release_placement_groups(catalog: Any, job_id: str) -> int:
    """Free what a killed run of the job still holds; returns how many groups were removed.

    Its placement groups (recorded as job events by rank 0) and its node-local /dev/shm base
    files (those on this node: a killed driver never reached its own clean-up).
    """
    from workers.training.shared_base import SHM_DIR

    for leftover in SHM_DIR.glob(f"lorafleet-base-{job_id}-*"):
        leftover.unlink(missing_ok=True)
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for event in jobs.iter_events(catalog, job_id=job_id, kinds=["placement_group"]):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(event.data["id"])))
        with contextlib.suppress(Exception):  # already gone: nothing to release
            remove_placement_group(pg)
            removed += 1
    return removed


def kill_runner(job_id: str) -> bool:
    """Kill a job's runner (and with it its Ray Train run); False if there was none."""
    import ray

    try:
        actor = ray.get_actor(runner_name(job_id), namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
