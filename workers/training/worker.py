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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage.cache import AdapterCache
from storage.catalog.domain import AdapterVersion, BaseModel, DataFile, FileDigest
from storage.objects import ObjectStore, file_sha256
from storage.settings import load_settings, node_catalog_url
from workers.base_model import load_base, load_tokenizer
from workers.errors import TrainingError
from workers.lora import lora_state_dict, save_adapter
from workers.training.collectives import FlatAllReduce, all_gather_strings, group_by_node
from workers.training.comm_audit import record_collectives, summarize
from workers.training.core import Member, RunHooks, metrics_event
from workers.training.core import summary as training_summary
from workers.training.distributed_spec import DistributedSpec
from workers.training.events import EventSink
from workers.training.methods import Method
from workers.training.recipe import LoraFinetuneRecipe
from workers.training.settings import StepReport
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
from workers.training.staged import resume_member, stage_checkpoint, stage_with_retries

log = logging.getLogger(__name__)


def lora_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the LoRA weights' bytes (equal on every rank after a correct all-reduce)."""
    h = hashlib.sha256()
    for key, tensor in sorted(lora_state_dict(model).items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def base_from_dict(d: dict[str, Any]) -> BaseModel:
    """A ``BaseModel`` from its ``asdict`` form (as it travels in a ``DistributedSpec``)."""
    files = tuple(FileDigest(**f) for f in d.get("files", ()))
    shapes = {k: tuple(v) for k, v in d.get("tensor_shapes", {}).items()}
    return BaseModel(**{**d, "files": files, "tensor_shapes": shapes})


def version_from_dict(d: dict[str, Any]) -> AdapterVersion:
    """An ``AdapterVersion`` from its ``asdict`` form (a warm start's starting adapter)."""
    return AdapterVersion(**{**d, "base_model": base_from_dict(d["base_model"]),
                             "files": tuple(FileDigest(**f) for f in d["files"]),
                             "tags": tuple(d.get("tags", ())),
                             "aliases": tuple(d.get("aliases", ())),
                             "created_at": None})  # fmt: skip


def load_grader_models(spec: DistributedSpec, store: ObjectStore) -> dict[str, Any]:
    """A score_model grader's adapters, each fetched into this node's verified cache."""
    if not spec.grader_adapters:
        return {}
    from workers.training.frozen_adapter import FrozenAdapter

    cache = AdapterCache(load_settings().cache_dir)
    return {ref: FrozenAdapter.from_dir(cache.get(version_from_dict(d), store))
            for ref, d in spec.grader_adapters.items()}  # fmt: skip


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


class _WorkerHooks(RunHooks):
    """Rank-local doings around each step: metrics to Ray Train and (rank 0) to the job's
    events, checkpoints staged in the object store."""

    def __init__(self, spec: DistributedSpec, store: ObjectStore, emit: EventSink | None,
                 reducer: FlatAllReduce, rank: int, grad_bytes: int) -> None:  # fmt: skip
        self.spec, self.store, self.emit = spec, store, emit
        self.reducer, self.rank, self.grad_bytes = reducer, rank, grad_bytes
        self.comm_before = 0

    def on_report(self, member: Member, report: StepReport) -> None:
        import ray.train

        step_comm = self.reducer.stats.bytes - self.comm_before
        member.curve[-1]["allreduce_bytes"] = step_comm
        if self.emit is not None:
            self.emit("metrics", metrics_event(report))
        ray.train.report({**member.curve[-1], "lora_grad_bytes": self.grad_bytes})

    def checkpoint(self, member: Member) -> None:
        if self.rank == 0:
            stage_checkpoint(member, self.spec.checkpoint_key, self.store, self.emit)


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
    method = Method.from_dict(spec.method)
    seq_len = spec.train.seq_len
    train_examples = method.load(data_path, tokenizer, seq_len=seq_len, name=names["t"])
    eval_examples = (method.load(eval_path, tokenizer, seq_len=seq_len, name=names["e"])
                     if eval_path else train_examples[:64])  # fmt: skip
    reducer = FlatAllReduce()
    recipe = LoraFinetuneRecipe(model, spec.lora, spec.train, pad_id=tokenizer.pad_token_id,
                                world=world, rank=rank, all_reduce=reducer, device=device,
                                objective=method.objective(), tokenizer=tokenizer)  # fmt: skip
    init_dir = None
    if spec.init_adapter is not None:
        if sharded:
            raise TrainingError("a warm start (init_adapter) trains on an unsharded base; use "
                                "base_placement shared_memory or private")  # fmt: skip
        cache = AdapterCache(load_settings().cache_dir)
        init_dir = cache.get(version_from_dict(spec.init_adapter), store)
    recipe.setup(inject=not sharded, init_adapter=init_dir)
    member = recipe.member
    assert member is not None
    member.grader_models = load_grader_models(spec, store)
    member.items, member.eval_items = train_examples, eval_examples
    member.checkpoint_every, member.lora = spec.checkpoint_every, spec.lora
    trainer = recipe.trainer
    trainer.members.pop(member.key, None)
    trainer.add(member)
    resumed_from = resume_member(member, spec.checkpoint_key, store)
    trainer.start(member.key)
    emit = event_sink_for(spec) if rank == 0 else None
    if emit is not None:
        # Ray Train's placement group outlives a killed driver (it belongs to the Ray job):
        # record it so whoever cancels this run can release the resources.
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            emit("placement_group", {"id": pg.id.hex(), "rank0_pid": os.getpid()})
    if emit is not None and resumed_from is not None:
        emit("resumed", {"from_step": resumed_from})

    # -- steps: the training core's run loop ---------------------------------------------------
    grad_bytes = sum(p.numel() * p.element_size() for p in member.params)
    bytes_before = reducer.stats.bytes
    hooks = _WorkerHooks(spec, store, emit, reducer, rank, grad_bytes)
    with record_collectives(nodes) as collectives:
        while not member.done:
            if spec.fail_at_step is not None and rank == min(1, world - 1):
                marker = Path(spec.fail_marker or "/tmp/lorafleet-fail-marker")
                if member.step == spec.fail_at_step and not marker.exists():
                    marker.write_text("failed once")
                    os._exit(1)  # a crash, not an exception: what a killed worker looks like
            hooks.comm_before = reducer.stats.bytes
            trainer.run_step(hooks)
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
        summary = training_summary(member, job_name=spec.job_name, world_size=world,
                                   nodes=len(set(nodes)), lora_grad_bytes=grad_bytes,
                                   dataset_sha256=file_sha256(data_path),
                                   workers=gathered)  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        stage_with_retries(store, out, spec.staging_prefix)  # the driver publishes from there
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    if leader and shm_file is not None:
        shm_file.unlink(missing_ok=True)
