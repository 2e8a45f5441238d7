"""The per-worker training function that Ray Train runs on every rank.

Plain Python around the recipe: fetch the inputs into this node's verified cache (the first
worker of a node downloads, the others wait), place the base (once per node), build the recipe
with a flat LoRA-gradient all-reduce, resume from the newest checkpoint in the object store,
then step, report and checkpoint. Checkpoints and the finished adapter go to the object store
(rank 0 stages them), so any node can resume the run and the driver can publish it. Ray is
imported only here and in ``ray_train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage.cache import AdapterCache
from storage.catalog.domain import BaseModel, DataFile, FileDigest
from storage.errors import IntegrityError, ObjectNotFound, ObjectStoreUnavailable
from storage.objects import ObjectStore, file_sha256
from storage.retry import with_retries
from storage.settings import load_settings, node_catalog_url
from storage.staging import (
    checkpoint_prefix,
    checkpoints,
    fetch_staged,
    prune_checkpoints,
    stage_dir,
)
from workers.base_model import load_base, load_tokenizer
from workers.datasets import load_dataset
from workers.errors import TrainingError
from workers.lora import lora_modules, lora_state_dict, save_adapter
from workers.training.checkpoint import read_checkpoint, write_checkpoint
from workers.training.collectives import FlatAllReduce, all_gather_strings, group_by_node
from workers.training.comm_audit import record_collectives, summarize
from workers.training.distributed_spec import DistributedSpec
from workers.training.events import EventSink
from workers.training.recipe import LoraFinetuneRecipe
from workers.training.sharded_base import load_sharded_base, local_base_bytes
from workers.training.shared_base import (
    PeakSampler,
    load_shared_base,
    mapping_pss,
    private_bytes,
    pss_bytes,
    shm_path_for,
    write_shared_base,
)

log = logging.getLogger(__name__)
STORE_OUTAGE_S = 300.0  # how long a checkpoint or result upload rides out a store outage


def lora_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the LoRA weights' bytes (equal on every rank after a correct all-reduce)."""
    h = hashlib.sha256()
    for key, tensor in sorted(lora_state_dict(model).items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(recipe: LoraFinetuneRecipe, directory: Path) -> None:
    """LoRA weights, optimizer state and step (``workers.training.checkpoint``'s format)."""
    assert recipe.optimizer is not None
    write_checkpoint(directory, lora_modules(recipe.model), recipe.optimizer, recipe.step)


def restore_checkpoint(recipe: LoraFinetuneRecipe, directory: Path) -> None:
    """Inverse of ``save_checkpoint``."""
    assert recipe.optimizer is not None
    recipe.step = read_checkpoint(directory, lora_modules(recipe.model), recipe.optimizer)


def base_from_dict(d: dict[str, Any]) -> BaseModel:
    """A ``BaseModel`` from its ``asdict`` form (as it travels in a ``DistributedSpec``)."""
    files = tuple(FileDigest(**f) for f in d.get("files", ()))
    shapes = {k: tuple(v) for k, v in d.get("tensor_shapes", {}).items()}
    return BaseModel(**{**d, "files": files, "tensor_shapes": shapes})


def file_from_dict(d: dict[str, Any]) -> DataFile:
    """A ``DataFile`` from its ``asdict`` form (``created_at`` is not needed on a worker)."""
    return DataFile(**{k: v for k, v in d.items() if k != "created_at"})


def fetch_inputs(spec: DistributedSpec, store: ObjectStore) -> tuple[str, str, str | None]:
    """(base dir, data path, eval path) on this node: registered inputs come through the
    node's own verified cache (its ``LORAFLEET_HOME``), local paths are used as they are."""
    cache = AdapterCache(load_settings().cache_dir)

    def data(record: dict[str, Any] | None, local: str | None) -> str | None:
        return str(cache.get_file(file_from_dict(record), store)) if record else local

    base_dir = str(cache.get_base(base_from_dict(spec.base), store)) if spec.base else spec.base_dir
    train = data(spec.data_file, spec.data_path)
    assert train is not None  # DistributedSpec requires one of the two
    return base_dir, train, data(spec.eval_file, spec.eval_path)


def event_sink_for(spec: DistributedSpec) -> EventSink | None:
    """An event sink appending job events to the catalog (through outages), or None."""
    if not spec.event_sink:
        return None
    from storage.catalog.db import Catalog
    from storage.catalog.jobs import add_event

    catalog = Catalog(node_catalog_url(spec.event_sink["catalog_url"]))
    job_id = spec.event_sink["job_id"]

    def write(kind: str, data: dict[str, Any]) -> None:
        add_event(catalog, job_id=job_id, kind=kind, data=data)

    return EventSink(write)


def stage_with_retries(store: ObjectStore, local_dir: Path, prefix: str) -> None:
    """``stage_dir`` through an object store outage (it starts over cleanly on each try)."""
    with_retries(lambda: stage_dir(store, local_dir, prefix), retry_on=(ObjectStoreUnavailable,),
                 deadline_s=STORE_OUTAGE_S, what=f"staging {prefix}")  # fmt: skip


def _checkpoint(
    recipe: LoraFinetuneRecipe, spec: DistributedSpec, store: ObjectStore, emit: Any
) -> None:
    """Rank 0: stage a checkpoint in the object store, keep the newest two, record it."""
    prefix = checkpoint_prefix(spec.checkpoint_key, recipe.step)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(recipe, Path(tmp))
        stage_with_retries(store, Path(tmp), prefix)
    try:
        prune_checkpoints(store, spec.checkpoint_key, keep=2)
    except ObjectStoreUnavailable as exc:  # older checkpoints linger until the next prune
        log.warning("pruning checkpoints failed: %s", exc)
    if emit is not None:
        emit("checkpoint", {"step": recipe.step, "uri": f"{store.uri}/{prefix}"})


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray
    import ray.train

    spec = DistributedSpec.from_dict(config["spec"])
    torch.set_num_threads(spec.threads_per_worker)
    store = spec.open_store()
    base_dir, data_path, eval_path = fetch_inputs(spec, store)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    nodes = all_gather_strings(node_id)
    local = group_by_node(nodes)[node_id]
    leader = local[0] == rank
    device = torch.device("cpu")
    if spec.use_gpu:
        import ray.train.torch as ray_torch

        device = ray_torch.get_device()
        if spec.base_placement == "shared_memory":
            raise TrainingError("shared_memory placement is for CPU nodes; use shard_per_node")

    # -- base placement: once per node ---------------------------------------------------------
    pss_before, private_before = pss_bytes(), private_bytes()
    materialized = False
    shm_file: Path | None = None
    with PeakSampler() as sampler:
        if spec.base_placement == "shard_per_node":
            torch.manual_seed(spec.train.seed)  # LoRA init as in the other placements
            model, _mesh = load_sharded_base(base_dir, spec.lora, nodes, device=device)
        elif spec.base_placement == "shared_memory":
            shm_file = shm_path_for(spec.job_name, node_id)
            if leader and not shm_file.exists():
                write_shared_base(base_dir, shm_file, dtype=torch.float32)
                materialized = True
            dist.barrier()
            model = load_shared_base(base_dir, shm_file)
        else:
            model, _ = load_base(base_dir, device=device)
            # transformers maps safetensors files copy-on-write, so an untouched model shares
            # the page cache; the baseline is what a worker that owns its weights holds.
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.clone()
        tokenizer = load_tokenizer(base_dir)
    pss_after = pss_bytes()
    sharded = spec.base_placement == "shard_per_node"
    base_bytes = (
        local_base_bytes(model)
        if sharded
        else sum(p.numel() * p.element_size() for p in model.parameters())
    )

    # errors name the uploaded file, not this node's cache path
    names = {
        k: (f or {}).get("filename") for k, f in (("t", spec.data_file), ("e", spec.eval_file))
    }
    train_examples = load_dataset(data_path, tokenizer, seq_len=spec.train.seq_len, name=names["t"])
    eval_examples = (
        load_dataset(eval_path, tokenizer, seq_len=spec.train.seq_len, name=names["e"])
        if eval_path
        else train_examples[:64]
    )
    reducer = FlatAllReduce()
    recipe = LoraFinetuneRecipe(
        model,
        spec.lora,
        spec.train,
        pad_id=tokenizer.pad_token_id,
        world=world,
        rank=rank,
        all_reduce=reducer,
        device=device,
    )
    recipe.setup(inject=not sharded)
    # One way back for every restart — Ray Train restarting the worker group after a lost
    # worker or node, or the scheduler starting a new attempt after a lost runner: the newest
    # complete checkpoint of this job in the object store, verified, on whichever node.
    # A checkpoint that cannot be read (bytes gone or corrupt) is skipped for an older one.
    resumed_from = None
    for _, prefix in checkpoints(store, spec.checkpoint_key):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                restore_checkpoint(recipe, fetch_staged(store, prefix, Path(tmp)))
        except (ObjectNotFound, IntegrityError) as exc:
            log.warning("checkpoint %s unusable (%s); trying an older one", prefix, exc)
            continue
        resumed_from = recipe.step
        break
    eval_initial = recipe.evaluate(eval_examples) if resumed_from is None else None
    emit = event_sink_for(spec) if rank == 0 else None
    if emit is not None:
        # Ray Train's placement group outlives a killed driver (it belongs to the Ray job):
        # record it so whoever cancels this run can release the resources.
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            emit("placement_group", {"id": pg.id.hex(), "rank0_pid": os.getpid()})
    if emit is not None and resumed_from is not None:
        emit("resumed", {"from_step": resumed_from})

    # -- steps -----------------------------------------------------------------------------------
    grad_bytes = sum(p.numel() * p.element_size() for p in recipe.params)
    bytes_before = reducer.stats.bytes
    t0 = time.perf_counter()
    tokens = 0
    last_eval = None
    curve: list[dict[str, Any]] = []
    with record_collectives(nodes) as collectives:
        while recipe.step < spec.train.max_steps:
            if spec.fail_at_step is not None and rank == min(1, world - 1):
                marker = Path(spec.fail_marker or "/tmp/lorafleet-fail-marker")
                if recipe.step == spec.fail_at_step and not marker.exists():
                    marker.write_text("failed once")
                    os._exit(1)  # a crash, not an exception: what a killed worker looks like
            comm_before = reducer.stats.bytes
            report = recipe.train_step(train_examples)
            step_comm = reducer.stats.bytes - comm_before
            tokens += report.tokens
            last = recipe.step == spec.train.max_steps
            if last or (spec.train.eval_every and recipe.step % spec.train.eval_every == 0):
                report.eval_loss = last_eval = recipe.evaluate(eval_examples)
            metrics = {
                **asdict(report),
                "allreduce_bytes": step_comm,
                "lora_grad_bytes": grad_bytes,
            }
            curve.append({"step": report.step, "loss": report.loss, "allreduce_bytes": step_comm})
            if emit is not None:
                emit(
                    "metrics",
                    {k: metrics[k] for k in ("step", "loss", "lr", "tokens_per_s", "eval_loss")},
                )
            due = spec.checkpoint_every and recipe.step % spec.checkpoint_every == 0
            if due and not last and rank == 0:
                _checkpoint(recipe, spec, store, emit)
            ray.train.report(metrics)
        elapsed = time.perf_counter() - t0
    if emit is not None:
        emit.close()  # events queued through a catalog outage are written before the result

    # -- results -------------------------------------------------------------------------------
    pss_end = pss_bytes()  # after training every mapped page has been touched and counted
    base_pss = mapping_pss(shm_file) if shm_file is not None else 0
    stats = {
        "rank": rank,
        "node_id": node_id,
        "materialized_base": materialized,
        "pss_before_setup": pss_before,
        "pss_after_setup": pss_after,
        "pss_after_training": pss_end,
        "base_mapping_pss": base_pss,
        "private_peak_growth_setup": sampler.peak - private_before,
        "base_param_bytes": base_bytes,
        "lora_checksum": lora_checksum(model),
        "allreduce_calls": reducer.stats.calls,
        "allreduce_bytes": reducer.stats.bytes - bytes_before,
        "steps_run": spec.train.max_steps - (resumed_from or 0),
        "placement": spec.base_placement,
        "collectives": summarize(collectives),
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        tmp_out = tempfile.mkdtemp(prefix="lorafleet-adapter-")
        base_ref = spec.base["name"] if spec.base else spec.base_dir
        out = save_adapter(model, spec.lora, tmp_out, base_model_name_or_path=base_ref)
        summary = {
            "job_name": spec.job_name,
            "world_size": world,
            "nodes": len(set(nodes)),
            "steps": spec.train.max_steps,
            "resumed_from_step": resumed_from,
            "eval_loss_initial": eval_initial,
            "eval_loss_final": last_eval,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "lora_grad_bytes": grad_bytes,
            "dataset_sha256": file_sha256(data_path),
            "lora": spec.lora.as_dict(),
            "train": asdict(spec.train),
            "workers": gathered,
            "curve": curve,
        }
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        stage_with_retries(store, out, spec.staging_prefix)  # the driver publishes from there
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    if leader and shm_file is not None:
        shm_file.unlink(missing_ok=True)
