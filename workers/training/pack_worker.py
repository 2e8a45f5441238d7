"""The per-worker function of a pack: several jobs on one base, one worker group.

Every rank loads the base once (node-shared memory on CPU nodes, as a lone job does) and runs
``PackedRecipe``. At each step boundary rank 0 calls the pack runner's ``sync`` — handing over
the jobs that ended since the last call, getting back the members of now — and broadcasts who
joins and who leaves, so every rank changes the pack identically. A joiner resumes from its
own newest checkpoint in the object store (or starts fresh); a job that reaches its last step
is evaluated, saved and staged under its own prefix, then leaves; a job that fails (a dataset
it cannot load, a loss that is not finite) leaves alone with its reason. A restarted group (a
lost worker or node) reads the members of now and resumes each from its checkpoint.

Ray is imported only inside ``train_pack_worker``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage.cache import AdapterCache
from storage.errors import StorageError
from storage.objects import ObjectStore, file_sha256
from storage.settings import load_settings
from workers.base_model import load_base, load_tokenizer
from workers.errors import WorkerError
from workers.training.collectives import FlatAllReduce, all_gather_strings, group_by_node
from workers.training.core import Member, RunHooks, metrics_event
from workers.training.core import summary as training_summary
from workers.training.distributed_spec import DistributedSpec, PackSpec
from workers.training.events import EventSink
from workers.training.methods import Method
from workers.training.packed import PackedRecipe
from workers.training.settings import StepReport
from workers.training.shared_base import load_shared_base, shm_path_for, write_shared_base
from workers.training.staged import resume_member, stage_checkpoint, stage_with_retries
from workers.training.worker import (
    base_from_dict,
    event_sink_for,
    file_from_dict,
    load_grader_models,
)

log = logging.getLogger(__name__)
# what one job of a pack hands back to the runner when it leaves: {"ok": True} (its adapter is
# staged under its staging prefix) or {"ok": False, "error": reason}
Outcome = dict[str, Any]


@dataclass
class JobRun:
    """What a rank keeps of one job beside its member of the trainer."""

    spec: DistributedSpec
    data_path: str
    sink: EventSink | None = None


def _place_base(spec: PackSpec, base_dir: str, shm_file: Path, leader: bool) -> torch.nn.Module:
    """The frozen base, once per node on CPU (``/dev/shm``, mapped read-only by every local
    worker, as a lone job places it); on GPU each worker holds its own."""
    if spec.use_gpu:
        import ray.train.torch as ray_torch

        model, _ = load_base(base_dir, device=ray_torch.get_device())
        return model
    if leader and not shm_file.exists():
        write_shared_base(base_dir, shm_file, dtype=torch.float32)
    dist.barrier()
    return load_shared_base(base_dir, shm_file)


class PackWorker(RunHooks):
    """One rank of a pack: membership changes, steps, checkpoints and results.

    Args:
        spec: the pack.
        recipe: the packed recipe over this rank's base.
        tokenizer: the base's tokenizer.
        store: the object store (inputs, checkpoints, results).
        cache: this node's verified cache.
        rank, world: this rank and the group's size.
        pg_event: rank 0's placement-group event data, recorded on every job that joins.
    """

    def __init__(
        self,
        spec: PackSpec,
        recipe: PackedRecipe,
        tokenizer: Any,
        store: ObjectStore,
        cache: AdapterCache,
        *,
        rank: int,
        world: int,
        pg_event: dict[str, Any] | None = None,
    ) -> None:
        self.spec, self.recipe, self.tokenizer = spec, recipe, tokenizer
        self.store, self.cache = store, cache
        self.rank, self.world = rank, world
        self.pg_event = pg_event
        self.runs: dict[str, JobRun] = {}
        self.outcomes: dict[str, Outcome] = {}  # rank 0: ended since the last sync

    # -- membership ------------------------------------------------------------------------
    def apply(self, members: dict[str, dict[str, Any]]) -> None:
        """Make the pack's jobs ``members`` (the same dict on every rank): leavers go, joiners
        come in (resumed from their checkpoints); a joiner that fails on any rank fails."""
        for job_id in [j for j in self.runs if j not in members]:
            self._leave(job_id)  # cancelled (the runner dropped it)
        joiners = {j: d for j, d in members.items() if j not in self.runs}
        errors: dict[str, str] = {}
        for job_id, entry in sorted(joiners.items()):
            try:
                self._prepare(job_id, DistributedSpec.from_dict(entry))
            except (WorkerError, StorageError, ValueError) as exc:
                errors[job_id] = f"{type(exc).__name__}: {exc}"
        # agree before any collective: a joiner that failed on one rank fails on all
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, errors)
        failed = {j: reason for rank_errors in everyone for j, reason in rank_errors.items()}
        for job_id, reason in sorted(failed.items()):
            self._fail(job_id, reason)
        for job_id in sorted(j for j in joiners if j not in failed):
            self._started(job_id)

    def _prepare(self, job_id: str, spec: DistributedSpec) -> None:
        """Load the joiner's data, add it to the trainer, resume its checkpoint (no
        collective)."""
        assert spec.data_file is not None
        method = Method.from_dict(spec.method)
        data_path = str(self.cache.get_file(file_from_dict(spec.data_file), self.store))
        seq_len = spec.train.seq_len
        train = method.load(data_path, self.tokenizer, seq_len=seq_len,
                            name=spec.data_file.get("filename"))  # fmt: skip
        if spec.eval_file:
            eval_path = str(self.cache.get_file(file_from_dict(spec.eval_file), self.store))
            evals = method.load(eval_path, self.tokenizer, seq_len=seq_len,
                                name=spec.eval_file.get("filename"))  # fmt: skip
        else:
            evals = train[:64]
        member = self.recipe.add(job_id, spec.lora, spec.train, train,
                                 objective=method.objective(), eval_items=evals,
                                 checkpoint_every=spec.checkpoint_every)  # fmt: skip
        self.runs[job_id] = JobRun(spec, data_path)
        member.grader_models = load_grader_models(spec, self.store)
        resume_member(member, spec.checkpoint_key, self.store)

    def _started(self, job_id: str) -> None:
        """A joiner every rank prepared: its initial evaluation and its first events."""
        run, member = self.runs[job_id], self.recipe.jobs[job_id]
        self.recipe.trainer.start(job_id)
        if self.rank == 0:
            run.sink = event_sink_for(run.spec)
            if run.sink is not None:
                if self.pg_event is not None:  # whoever cancels a lost run releases the group
                    run.sink("placement_group", self.pg_event)
                run.sink("packed", {"pack_id": self.spec.pack_id, "step": member.step})
                if member.resumed_from is not None:
                    run.sink("resumed", {"from_step": member.resumed_from})

    def _leave(self, job_id: str) -> None:
        if job_id in self.recipe.jobs:
            self.recipe.remove(job_id)
        run = self.runs.pop(job_id, None)
        if run is not None and run.sink is not None:
            run.sink.close()

    def _fail(self, job_id: str, reason: str) -> None:
        log.warning("pack %s: job %s failed: %s", self.spec.pack_id, job_id, reason)
        self._leave(job_id)
        if self.rank == 0:
            self.outcomes[job_id] = {"ok": False, "error": reason}

    # -- steps: the training core's run loop, with this worker as its hooks -------------------
    def step(self) -> dict[str, StepReport]:
        """One step of every job; evaluations, checkpoints and results as each job asks."""
        return self.recipe.trainer.run_step(self)

    def on_report(self, member: Member, report: StepReport) -> None:
        sink = self.runs[member.key].sink
        if sink is not None:
            sink("metrics", metrics_event(report))

    def checkpoint(self, member: Member) -> None:
        if self.rank == 0:
            run = self.runs[member.key]
            stage_checkpoint(member, run.spec.checkpoint_key, self.store, run.sink)

    def failed(self, member: Member, reason: str) -> None:
        self._fail(member.key, reason)

    def finish(self, member: Member) -> None:
        """Rank 0 saves and stages the job's adapter and summary; every rank drops it."""
        job_id = member.key
        if self.rank == 0:
            run = self.runs[job_id]
            tmp = tempfile.mkdtemp(prefix="lorafleet-adapter-")
            try:
                out = self.recipe.save(job_id, tmp, base_model_name_or_path=self.spec.base["name"])
                summary = training_summary(member, job_name=run.spec.job_name,
                                           world_size=self.world,
                                           dataset_sha256=file_sha256(run.data_path),
                                           pack={"id": self.spec.pack_id})  # fmt: skip
                (out / "metrics.json").write_text(json.dumps(summary, indent=2))
                stage_with_retries(self.store, out, run.spec.staging_prefix)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.outcomes[job_id] = {"ok": True}
        self._leave(job_id)


def train_pack_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` for a pack."""
    import os

    import ray
    import ray.train

    spec = PackSpec.from_dict(config["spec"])
    torch.set_num_threads(spec.threads_per_worker)
    store = spec.open_store()
    cache = AdapterCache(load_settings().cache_dir)
    base_dir = str(cache.get_base(base_from_dict(spec.base), store))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    nodes = all_gather_strings(node_id)
    leader = group_by_node(nodes)[node_id][0] == rank
    shm_file = shm_path_for(spec.pack_id, node_id)
    model = _place_base(spec, base_dir, shm_file, leader)
    tokenizer = load_tokenizer(base_dir)
    device = next(model.parameters()).device
    recipe = PackedRecipe(model, pad_id=tokenizer.pad_token_id, world=world, rank=rank,
                          all_reduce=FlatAllReduce(), device=device,
                          tokenizer=tokenizer)  # fmt: skip
    control = None
    pg_event = None
    if rank == 0:
        control = ray.get_actor(spec.control["name"], namespace=spec.control["namespace"])
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            pg_event = {"id": pg.id.hex(), "rank0_pid": os.getpid()}
    worker = PackWorker(spec, recipe, tokenizer, store, cache, rank=rank, world=world,
                        pg_event=pg_event)  # fmt: skip
    while True:
        box: list[Any] = [None]
        if control is not None:
            box[0] = ray.get(control.sync.remote(worker.outcomes))
            worker.outcomes = {}
        dist.broadcast_object_list(box, src=0)
        worker.apply(box[0])
        if not worker.runs:
            break
        reports = worker.step()
        ray.train.report({"jobs": len(reports), "tokens": sum(r.tokens for r in reports.values())})
    if control is not None and worker.outcomes:
        ray.get(control.sync.remote(worker.outcomes))
    dist.barrier()
    if leader:
        shm_file.unlink(missing_ok=True)
