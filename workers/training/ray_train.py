"""Thin Ray Train wrapper: ``train_distributed(spec)`` runs ``train_worker`` on N workers, and
``train_pack(spec)`` runs a pack's ``train_pack_worker``.

Everything numerical lives in the recipe and the worker function; this module only turns a
``DistributedSpec`` into Ray Train's configs, runs it, and turns Ray's failure into ours.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.staging import fetch_staged
from workers.errors import TrainingError
from workers.training.distributed_spec import DistributedSpec, PackSpec

log = logging.getLogger(__name__)
# Each ray.train.report waits up to one health-check interval (2 s by default): with a report
# per step that would dominate step time. Workers inherit this through the runtime env.
REPORT_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05"}
# glibc raises its mmap threshold after the first large free, after which freed all-gather
# buffers (FSDP unshards a layer per step) stay in the heap and the process only grows. A
# fixed threshold keeps large blocks mmapped, so freeing them returns the memory.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@dataclass
class DistributedResult:
    """The adapter directory (on the driver, fetched verified) and the run's summary."""

    adapter_dir: Path
    metrics: dict[str, Any]


def _worker_env() -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in {**REPORT_ENV, **ALLOCATOR_ENV}.items()}
    for key in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker. Imports the worker code there, not here: the
    driver (often a freshly started runner process) never needs transformers."""
    from workers.training.worker import train_worker

    train_worker(config)


def _remove_shared_bases(job_name: str) -> None:
    """Workers remove their node's /dev/shm base at the end; after a crash nobody did, so the
    driver removes what it can see (its own node, and every simulated node of a test cluster)."""
    from workers.training.shared_base import SHM_DIR, shm_path_for

    for leftover in SHM_DIR.glob(shm_path_for(job_name, "*").name + "*"):
        leftover.unlink(missing_ok=True)


def failure_reason(exc: BaseException) -> str:
    """One line naming what went wrong on the workers: ``Type: message``.

    Ray Train wraps a worker's exception (``WorkerGroupError.worker_failures`` → a task error
    whose ``cause`` is the original), so the user's own error — a dataset problem, say — is
    dug out rather than the wrapper's headline.
    """
    cause: BaseException = exc
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        cause = failures[min(failures)]
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def pack_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker of a pack (see ``train_loop``)."""
    from workers.training.pack_worker import train_pack_worker

    train_pack_worker(config)


def _fit(
    loop: Any,
    config: dict[str, Any],
    *,
    name: str,
    workers: int,
    nodes: int,
    cpus_per_worker: float,
    use_gpu: bool,
    storage_path: str,
    max_failures: int,
) -> Any:
    """Run ``loop`` on a Ray Train worker group; returns Ray's result.

    Raises:
        TrainingError: the run failed (after ``max_failures`` restarts), with the root cause.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.update({k: v for k, v in REPORT_ENV.items() if k not in os.environ})
    if not ray.is_initialized():
        raise TrainingError("no Ray cluster: call ray.init() (or set LORAFLEET_RAY_ADDRESS)")
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy="SPREAD" if nodes > 1 else "PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            # Worker and node loss inside a run is retried here, and only here; checkpoints are
            # not Ray's (they are staged in the object store), so a restarted group and a new
            # attempt resume the same way.
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": _worker_env()},  # type: ignore[call-arg]
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError wraps the worker's error
        raise TrainingError(
            f"training {name} failed (max_failures={max_failures}): {failure_reason(exc)}"
        ) from exc
    finally:
        _remove_shared_bases(name)
    if result.error is not None:
        raise TrainingError(f"training {name} failed: {result.error}")
    return result


def train_distributed(spec: DistributedSpec) -> DistributedResult:
    """Run data-parallel LoRA training on the connected Ray cluster (``ray.init`` first).

    Raises:
        TrainingError: the run failed (after ``max_failures`` restarts), with the root cause.
    """
    _fit(train_loop, {"spec": spec.to_dict()}, name=spec.job_name, workers=spec.workers,
         nodes=spec.nodes, cpus_per_worker=spec.cpus_per_worker, use_gpu=spec.use_gpu,
         storage_path=spec.storage_path, max_failures=spec.max_failures)  # fmt: skip
    return fetch_result(spec)


def fetch_result(spec: DistributedSpec) -> DistributedResult:
    """The run's adapter and summary, fetched verified from its staging prefix to ``out_dir``.

    The staged copy stays until the caller has kept the result (published it, or written it
    where the user asked): a failed publish must not lose a trained adapter.
    """
    out = fetch_staged(spec.open_store(), spec.staging_prefix, Path(spec.out_dir))
    metrics = json.loads((out / "metrics.json").read_text())
    return DistributedResult(adapter_dir=out, metrics=metrics)


def train_pack(spec: PackSpec) -> None:
    """Run a pack's worker group until its last job has left (``ray.init`` first).

    Its jobs come and go through the runner actor named in ``spec.control``, and so do their
    results: each job's adapter is staged under its own prefix as it ends.

    Raises:
        TrainingError: the group failed (after ``max_failures`` restarts), with the root cause.
    """
    _fit(pack_loop, {"spec": spec.to_dict()}, name=spec.pack_id, workers=spec.workers,
         nodes=spec.nodes, cpus_per_worker=spec.cpus_per_worker, use_gpu=spec.use_gpu,
         storage_path=spec.storage_path, max_failures=spec.max_failures)  # fmt: skip
