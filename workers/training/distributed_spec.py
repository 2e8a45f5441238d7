"""What a distributed training run needs to know: a plain, serialisable description."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from storage.objects import ObjectStore, open_store
from workers.errors import TrainingError
from workers.lora import LoraConfig
from workers.training.methods import Method
from workers.training.settings import TrainConfig

BasePlacement = Literal["shared_memory", "shard_per_node", "private"]


@dataclass(frozen=True)
class DistributedSpec:
    """A data-parallel LoRA run on Ray Train.

    Nodes share only the object store (and the catalog): a run's inputs are either objects
    there — ``base`` (a registered base) and ``data_file``/``eval_file`` (uploaded files),
    which every node downloads into its own verified cache — or, for a run on one machine,
    local paths (``base_dir``, ``data_path``, ``eval_path``). Checkpoints and the finished
    adapter travel back through ``store`` too.

    Attributes:
        job_name: unique per run (names the Ray Train run, the staging prefix of the result
            and the node-local base file).
        base, data_file, eval_file: catalog records as dicts (``BaseModel`` / ``DataFile``).
        base_dir, data_path, eval_path: local paths (one-machine runs only).
        store: ``{"uri", "s3_endpoint"}`` of the object store.
        out_dir: where ``train_distributed`` (on the driver) puts the finished adapter and
            ``metrics.json``, fetched verified from the store.
        storage_path: Ray Train's own run state (the driver's node; no checkpoint goes there).
        checkpoint_key: checkpoints are staged under ``checkpoints/<checkpoint_key>/``; runs
            that share it (attempts of one job) resume from each other.
        workers: total workers; ``nodes`` > 1 asks Ray to spread them.
        base_placement: ``shared_memory`` (the CPU default: base once per node in /dev/shm,
            mapped read-only by every worker), ``shard_per_node`` (the GPU default: FSDP2 on a
            nodes × workers mesh, base sharded within a node, HSDP), or ``private`` (each
            worker holds its own copy: the baseline that benchmarks compare against).
            ``None`` picks the default for ``use_gpu``.
        checkpoint_every: steps between checkpoints (0: only at the end).
        max_failures: worker-group restarts Ray Train may do before the run fails.
        fail_at_step: test hook — rank 1 dies once at this step.
        event_sink: ``{"catalog_url", "job_id"}``: rank 0 appends a metrics event per step.
        method: OpenAI's ``method`` object (``workers.training.methods.Method``).
        init_adapter: the catalog record (``AdapterVersion`` as a dict) of the adapter a warm
            start begins from; every node fetches it into its own verified cache.
        grader_adapters: a score_model grader's adapters, ref → catalog record (fetched
            the same way).
    """

    job_name: str
    out_dir: str
    storage_path: str
    store: dict[str, Any]
    base_dir: str = ""
    data_path: str = ""
    base: dict[str, Any] | None = None
    data_file: dict[str, Any] | None = None
    eval_file: dict[str, Any] | None = None
    checkpoint_key: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_path: str | None = None
    workers: int = 2
    nodes: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    base_placement: BasePlacement | None = None
    checkpoint_every: int = 0
    max_failures: int = 0
    threads_per_worker: int = 1
    fail_at_step: int | None = None
    fail_marker: str | None = None
    event_sink: dict[str, str] | None = None
    method: dict[str, Any] = field(default_factory=lambda: {"type": "supervised"})
    init_adapter: dict[str, Any] | None = None
    grader_adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Method.from_dict(self.method)  # refuses an unknown method or bad hyperparameters
        if not (self.base or self.base_dir):
            raise TrainingError("base: give a registered base or a local base_dir")
        if not (self.data_file or self.data_path):
            raise TrainingError("data: give an uploaded data_file or a local data_path")
        if not self.checkpoint_key:
            object.__setattr__(self, "checkpoint_key", self.job_name)
        if self.workers < 1:
            raise TrainingError(f"workers: must be ≥ 1, got {self.workers}")
        if self.nodes < 1 or self.workers % self.nodes:
            raise TrainingError(f"nodes: must divide workers ({self.workers}), got {self.nodes}")
        if self.base_placement is None:
            default = "shard_per_node" if self.use_gpu else "shared_memory"
            object.__setattr__(self, "base_placement", default)
        if self.base_placement not in ("shared_memory", "shard_per_node", "private"):
            raise TrainingError(f"base_placement: unknown placement {self.base_placement!r}")
        if self.checkpoint_every < 0 or self.max_failures < 0:
            raise TrainingError("checkpoint_every and max_failures must be ≥ 0")

    @property
    def staging_prefix(self) -> str:
        """Where rank 0 stages the finished adapter and ``metrics.json`` for the driver."""
        return f"staging/{self.job_name}"

    def open_store(self) -> ObjectStore:
        """The object store the run's inputs, checkpoints and result travel through."""
        return open_store(self.store["uri"], s3_endpoint=self.store.get("s3_endpoint"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistributedSpec:
        lora = dict(d["lora"])
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(**{**d, "lora": LoraConfig(**lora), "train": TrainConfig(**d["train"])})


@dataclass(frozen=True)
class PackSpec:
    """One worker group that trains a pack of jobs on one base (``workers.training.pack_worker``).

    What the group shares travels here; its jobs do not. Each job (a ``DistributedSpec`` of
    its own data, LoRA config, schedule, checkpoints, staging prefix and event sink) is handed
    to rank 0 by the pack's runner at a step boundary, through the actor named ``control``, so
    joiners and leavers need no restart and a restarted group reads the members of now.

    Attributes:
        pack_id: names the Ray Train run and the node-local base file.
        base, store, storage_path, workers, nodes, cpus_per_worker, use_gpu, max_failures,
            threads_per_worker: as ``DistributedSpec``.
        control: ``{"name", "namespace"}`` of the runner actor that answers ``sync``.
    """

    pack_id: str
    base: dict[str, Any]
    store: dict[str, Any]
    storage_path: str
    control: dict[str, str]
    workers: int = 1
    nodes: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 0
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.nodes < 1 or self.workers % self.nodes:
            raise TrainingError(f"nodes ({self.nodes}) must divide workers ({self.workers})")

    def open_store(self) -> ObjectStore:
        return open_store(self.store["uri"], s3_endpoint=self.store.get("s3_endpoint"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackSpec:
        return cls(**d)
