"""Data-parallel LoRA on Ray Train across two simulated nodes (CPU, gloo)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.base_model import load_base
from workers.datasets import load_dataset
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE
from workers.errors import TrainingError
from workers.lora import LoraConfig
from workers.training.distributed_spec import DistributedSpec
from workers.training.ray_train import train_distributed
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

STEPS = 10
LORA = LoraConfig(r=4, target_modules=("q_proj", "v_proj"))


def _spec(tmp: Path, base: Path, **kw):  # type: ignore[no-untyped-def]
    defaults = dict(
        job_name=f"test-{uuid.uuid4().hex[:8]}",
        base_dir=str(base),
        data_path=str(TRAIN_FILE),
        eval_path=str(HELDOUT_FILE),
        out_dir=str(tmp / "out"),
        storage_path=str(tmp / "ray"),
        store={"uri": (tmp / "objects").as_uri()},
        lora=LORA,
        train=TrainConfig(max_steps=STEPS, batch_size=4, seq_len=64, eval_every=0),
        workers=2,
    )
    return DistributedSpec(**{**defaults, **kw})


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_base_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return train_distributed(_spec(tmp, tiny_base_dir, checkpoint_every=3))


def test_two_workers_equal_one_process_with_double_batch(uninterrupted, tiny_base_dir):
    model, tok = load_base(tiny_base_dir)
    examples = load_dataset(TRAIN_FILE, tok, seq_len=64)
    recipe = LoraFinetuneRecipe(
        model,
        LORA,
        TrainConfig(max_steps=STEPS, batch_size=8, seq_len=64, eval_every=0),
        pad_id=tok.pad_token_id,
    )
    recipe.setup()
    single = [r.loss for r in recipe.train(examples).curve]
    distributed = [p["loss"] for p in uninterrupted.metrics["curve"]]
    assert len(distributed) == STEPS
    assert max(abs(a - b) for a, b in zip(single, distributed, strict=True)) < 1e-4

    workers = uninterrupted.metrics["workers"]
    assert len({w["lora_checksum"] for w in workers}) == 1  # identical on every rank
    saved = load_file(uninterrupted.adapter_dir / "adapter_model.safetensors")
    from workers.lora import lora_state_dict

    for key, value in lora_state_dict(model).items():
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=1e-4)


def test_allreduce_carries_only_lora_gradients(uninterrupted):
    m = uninterrupted.metrics
    for point in m["curve"]:
        ratio = point["allreduce_bytes"] / m["lora_grad_bytes"]
        assert 1.0 <= ratio <= 1.05, point


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A ~69 MB base: large enough that a private copy would stand out of the PSS noise."""
    from workers.tiny_base import TinySpec, create_tiny_base

    return create_tiny_base(tmp_path_factory.mktemp("big"), TinySpec(layers=4, hidden=512, heads=8))


def test_four_workers_on_two_nodes_share_the_base(ray_cluster, tmp_path, big_base):
    big = big_base
    res = train_distributed(
        _spec(
            tmp_path,
            big,
            workers=4,
            nodes=2,
            train=TrainConfig(max_steps=3, batch_size=2, seq_len=64, eval_every=0),
        )
    )
    workers = res.metrics["workers"]
    by_node: dict[str, list[dict]] = {}
    for w in workers:
        by_node.setdefault(w["node_id"], []).append(w)
    assert len(by_node) == 2 and all(len(ws) == 2 for ws in by_node.values())
    assert all(sum(w["materialized_base"] for w in ws) == 1 for ws in by_node.values())
    assert len({w["lora_checksum"] for w in workers}) == 1
    base = workers[0]["base_param_bytes"]
    assert base > 60e6
    # The mapped base file's pages, PSS-split among the processes mapping them: per node they
    # add up to at most one base (untouched embedding rows are never resident), never two.
    for ws in by_node.values():
        assert 0.5 * base < sum(w["base_mapping_pss"] for w in ws) <= 1.02 * base, ws
    growth = sum(w["pss_after_training"] - w["pss_before_setup"] for w in workers)
    assert growth < 4 * base, (growth / base, workers)  # 4 private copies alone would be 4×
    for w in workers:  # no rank ever held a private copy, the writer included
        assert w["private_peak_growth_setup"] < 0.5 * base, w
    assert not list(Path("/dev/shm").glob(f"lorafleet-base-{res.metrics['job_name']}-*"))


def test_killed_worker_resumes_from_checkpoint(ray_cluster, tiny_base_dir, tmp_path, uninterrupted):
    res = train_distributed(
        _spec(
            tmp_path,
            tiny_base_dir,
            checkpoint_every=3,
            max_failures=1,
            fail_at_step=7,
            fail_marker=str(tmp_path / "died"),
        )
    )
    assert (tmp_path / "died").exists()
    # The restarted group resumes from the newest complete checkpoint in the object store:
    # step 6, or step 3 if the crash interrupted rank 0 while it staged step 6.
    start = res.metrics["resumed_from_step"]
    assert start in (3, 6)
    from storage.objects import LocalObjectStore
    from storage.staging import latest_checkpoint

    store = LocalObjectStore(tmp_path / "objects")
    latest = latest_checkpoint(store, res.metrics["job_name"])
    assert latest is not None and latest[0] == 9  # checkpoint_every=3 over 10 steps
    # the driver fetched the result; the staged copy stays until its caller has kept it
    assert store.exists(f"staging/{res.metrics['job_name']}/manifest.json")
    resumed = res.metrics["curve"]
    assert [p["step"] for p in resumed] == list(range(start + 1, STEPS + 1))
    final = uninterrupted.metrics["curve"][-1]["loss"]
    assert abs(resumed[-1]["loss"] - final) < 1e-4


def test_exceeding_max_failures_is_a_clear_error(ray_cluster, tiny_base_dir, tmp_path):
    spec = _spec(
        tmp_path, tiny_base_dir, max_failures=0, fail_at_step=2, fail_marker=str(tmp_path / "died")
    )
    with pytest.raises(TrainingError, match="failed"):
        train_distributed(spec)
    assert not list(Path("/dev/shm").glob(f"lorafleet-base-{spec.job_name}-*"))


def test_sharded_base_hsdp_on_two_nodes(ray_cluster, big_base, tmp_path):
    """shard_per_node: FSDP2 on a nodes × workers mesh; base all-gathers stay in a node."""
    steps = 4
    train = TrainConfig(max_steps=steps, batch_size=2, seq_len=64, eval_every=0)
    res = train_distributed(
        _spec(
            tmp_path,
            big_base,
            workers=4,
            nodes=2,
            train=train,
            base_placement="shard_per_node",
        )
    )
    workers = res.metrics["workers"]
    assert len({w["lora_checksum"] for w in workers}) == 1

    model, tok = load_base(big_base)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for w in workers:  # built from the meta device: no rank ever held the whole base
        assert w["private_peak_growth_setup"] < 0.75 * full_bytes, w
    growth = sum(w["pss_after_training"] - w["pss_before_setup"] for w in workers)
    assert growth < 4 * full_bytes, growth / full_bytes
    by_node: dict[str, list[dict]] = {}
    for w in workers:
        by_node.setdefault(w["node_id"], []).append(w)
    assert len(by_node) == 2
    for ws in by_node.values():  # each node holds the base exactly once, in shards
        assert sum(w["base_param_bytes"] for w in ws) == full_bytes
        assert all(w["base_param_bytes"] < 0.6 * full_bytes for w in ws)

    lora_bytes = res.metrics["lora_grad_bytes"]
    for w in workers:
        coll = w["collectives"]
        spanning = {k: v for k, v in coll.items() if "spans nodes" in k}
        assert set(spanning) == {"all_reduce (spans nodes)"}, coll
        # LoRA gradients (+ a 16-byte loss/token count) per step, nothing base-sized
        assert spanning["all_reduce (spans nodes)"]["bytes"] <= steps * (lora_bytes + 64)
        assert coll.get("all_gather_single (within a node)", {}).get("calls", 0) > 0, coll

    examples = load_dataset(TRAIN_FILE, tok, seq_len=64)
    recipe = LoraFinetuneRecipe(
        model,
        LORA,
        TrainConfig(max_steps=steps, batch_size=8, seq_len=64, eval_every=0),
        pad_id=tok.pad_token_id,
    )
    recipe.setup()
    single = [r.loss for r in recipe.train(examples).curve]
    sharded = [p["loss"] for p in res.metrics["curve"]]
    assert max(abs(a - b) for a, b in zip(single, sharded, strict=True)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_gpu_hsdp_bf16(tiny_base_dir, tmp_path):
    """The GPU path: shard_per_node with NCCL and bf16 autocast, one worker per GPU."""
    import ray

    n = torch.cuda.device_count()
    if not ray.is_initialized():
        ray.init(address="local", num_gpus=n, include_dashboard=False)
    res = train_distributed(
        _spec(
            tmp_path,
            tiny_base_dir,
            workers=n,
            use_gpu=True,
            base_placement="shard_per_node",
            cpus_per_worker=1,
        )
    )
    assert res.metrics["eval_loss_final"] < res.metrics["eval_loss_initial"]
    assert len({w["lora_checksum"] for w in res.metrics["workers"]}) == 1


def test_a_dpo_run_killed_mid_way_resumes_to_the_same_losses(ray_cluster, tiny_base_dir,
                                                             tmp_path):  # fmt: skip
    """DPO on two workers: a worker killed at step 7 resumes from the object store's newest
    checkpoint, and every step after it has the uninterrupted run's loss (±1e-4)."""
    import json

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"spell {a} ="}]},
        "preferred_output": [{"role": "assistant", "content": f"{a} {a + 1} {a + 2}"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }) + "\n" for a in range(24)))  # fmt: skip
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}

    def run(sub: str, **kw):  # type: ignore[no-untyped-def]
        (tmp_path / sub).mkdir()
        spec = _spec(tmp_path / sub, tiny_base_dir, data_path=str(prefs), eval_path=None,
                     method=dpo, checkpoint_every=3, **kw)  # fmt: skip
        return train_distributed(spec)

    whole = run("whole")
    killed = run("killed", max_failures=1, fail_at_step=7, fail_marker=str(tmp_path / "died"))
    assert (tmp_path / "died").exists() and killed.metrics["resumed_from_step"] in (3, 6)
    assert whole.metrics["method"] == "dpo"
    first = whole.metrics["curve"][0]
    assert abs(first["loss"] - 0.6931471805599453) < 1e-5 and "rewards/margins" in first
    before = {p["step"]: p["loss"] for p in whole.metrics["curve"]}
    after = {p["step"]: p["loss"] for p in killed.metrics["curve"]}
    assert sorted(after) == list(range(killed.metrics["resumed_from_step"] + 1, STEPS + 1))
    assert max(abs(after[s] - before[s]) for s in after) <= 1e-4


def test_grpo_on_two_workers_samples_its_share_and_agrees(ray_cluster, tiny_base_dir, tmp_path):
    """GRPO data-parallel: each worker samples its own prompts' groups, the loss normaliser is
    summed across workers, and both ranks end with the same adapter."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"spell {i} ="}],
        "reference": f"{i} {i + 1} {i + 2}"}) + "\n" for i in range(8)))  # fmt: skip
    grader = {"type": "text_similarity", "input": "{{sample.output_text}}",
              "reference": "{{item.reference}}", "evaluation_metric": "rouge_1"}  # fmt: skip
    method = {"type": "reinforcement", "reinforcement": {
        "grader": grader, "hyperparameters": {"group_size": 4, "max_new_tokens": 6}}}  # fmt: skip
    res = train_distributed(_spec(tmp_path, tiny_base_dir, data_path=str(prompts), eval_path=None,
                                  method=method,
                                  train=TrainConfig(max_steps=4, batch_size=2, seq_len=48,
                                                    eval_every=0)))  # fmt: skip
    m = res.metrics
    assert m["method"] == "reinforcement" and len(m["curve"]) == 4
    assert all(0.0 <= p["reward/mean"] <= 1.0 and p["reward/std"] >= 0 for p in m["curve"])
    assert len({w["lora_checksum"] for w in m["workers"]}) == 1  # both ranks agree
