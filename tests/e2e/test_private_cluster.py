"""The main job on a cluster whose nodes share no disk, as a user runs it from the CLI.

A head and three worker nodes (``ray start``, each in its own mount namespace: own home,
``/tmp`` and ``/dev/shm``), PostgreSQL and SeaweedFS S3. The client's directory — the base and
the dataset the user points at — is invisible to every node, so anything that crossed nodes
as a path would fail here as on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.local_stack import cluster_stack
from infra.private_nodes import PrivateCluster, can_isolate, kill_node, node_running
from infra.servers import free_port, wait_until
from storage.catalog import jobs
from storage.registry import Registry
from storage.settings import load_settings
from workers.demo_task import HELDOUT_FILE, TRAIN_FILE

pytestmark = pytest.mark.skipif(
    not can_isolate(), reason="needs root (CAP_SYS_ADMIN) to mount in a new mount namespace"
)
# Node death noticed in ~2 s instead of Ray's default ~15 s.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], PrivateCluster, Path]]:
    work = tmp_path_factory.mktemp("client")
    saved = {k: os.environ.get(k) for k in FAST_HEALTH}
    os.environ.update(FAST_HEALTH)
    try:
        with cluster_stack(work, workers=3, cpus=1) as (env, cluster):
            env["COLUMNS"] = "200"
            yield env, cluster, work
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli(env: dict[str, str], *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def _job_yaml(work: Path, name: str, method: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None, **training: Any) -> Path:  # fmt: skip
    data = {"training_data": str(work / "data" / "train.jsonl"),  # a client path: uploaded
            "validation_data": str(work / "data" / "heldout.jsonl")}  # fmt: skip
    if method is not None and method["type"] == "dpo":
        data = {"training_data": str(work / "data" / "prefs.jsonl")}
    spec = {"name": name, "namespace": "demo", "base_model": "tiny", **data,
            "method": method or {"type": "supervised"},
            "output_adapter": f"demo/{name}",
            "training": {"batch_size": 4, "seq_len": 64, "eval_every": 0, **training},
            "resources": {"nodes": 2, "workers_per_node": 1}, "max_failures": 2,
            **(extra or {})}  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _client_files(work: Path) -> Path:
    from workers.tiny_base import create_tiny_base

    base = work / "tiny-base"
    if not base.exists():
        create_tiny_base(base)
        (work / "data").mkdir()
        shutil.copy(TRAIN_FILE, work / "data" / "train.jsonl")
        shutil.copy(HELDOUT_FILE, work / "data" / "heldout.jsonl")
        (work / "data" / "prefs.jsonl").write_text("".join(json.dumps({
            "input": {"messages": [{"role": "user", "content": f"spell {a} {a + 1} ="}]},
            "preferred_output": [{"role": "assistant", "content": f"{a} {a + 1} {a + 2}"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }) + "\n" for a in range(24)))  # fmt: skip
    return base


def test_register_submit_train_publish_serve_with_no_shared_disk(stack) -> None:  # type: ignore[no-untyped-def]
    import openai
    from peft import PeftModel

    from workers.base_model import load_base
    from workers.generate import greedy_generate

    env, _, work = stack
    base_dir = _client_files(work)
    r = _cli(env, "base", "register", "tiny", base_dir)
    assert r.returncode == 0 and "in the object store" in r.stdout, r.stdout + r.stderr
    r = _cli(env, "submit", _job_yaml(work, "digits", max_steps=40), "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "uploaded train.jsonl as file-" in r.stdout and "adapter demo/digits:1" in r.stdout

    registry = Registry.from_settings(load_settings(env))
    version = registry.resolve("demo/digits:1")
    assert version.metrics["nodes"] == 2 and version.state == "ready"
    job = jobs.get_job(registry.catalog, job_id=str(version.job_id))
    assert job.spec["training_data"].startswith("file-") and job.attempts == 1
    assert version.hyperparameters["data"]["training_file"] == job.spec["training_data"]
    _, adapter_dir = registry.fetch("demo/digits:1")  # downloaded, verified, to the client

    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--base", "tiny", "--port", str(port),
         "--slots", "2", "--cpus-per-replica", "0.5"],
        env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    return bool(json.loads(resp.read())["status"] == "ok")
            except OSError:
                return False

        wait_until(lambda: up() or serve.poll() is not None, timeout_s=240, what="serve")
        assert serve.poll() is None, serve.communicate()[1][-3000:]
        admin = env["LORAFLEET_API_TOKEN"]  # the nodes' own: the serve command sends none
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=admin, max_retries=0)
        prompts = ["spell 3 1 4 =", "spell 2 7 =", "spell 9 =", "spell 5 0 5 5 ="]
        served = [
            client.completions.create(model="demo/digits:1", prompt=p, max_tokens=8, temperature=0)
            .choices[0]
            .text
            for p in prompts
        ]
        # a tool call: the replica on a private node compiles the grammar with the tokenizer
        # of the base it downloaded and verified itself
        params = {"type": "object", "properties": {"digit": {"enum": ["one", "two"]}},
                  "required": ["digit"], "additionalProperties": False}  # fmt: skip
        called = client.chat.completions.create(
            model="demo/digits:1", messages=[{"role": "user", "content": "spell 2 ="}],
            max_tokens=90, temperature=0, tool_choice="required", parallel_tool_calls=False,
            tools=[{"type": "function", "function": {"name": "spell", "parameters": params}}],
        ).choices[0]  # fmt: skip
        assert called.finish_reason == "tool_calls"
        assert json.loads(called.message.tool_calls[0].function.arguments)["digit"] in (  # type: ignore[index]
            "one",
            "two",
        )
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=120)
    model, tok = load_base(base_dir)
    peft = PeftModel.from_pretrained(model, str(adapter_dir))
    assert served == greedy_generate(peft, tok, prompts, max_new_tokens=8)

    # DPO warm-started from that adapter: each private node fetches demo/digits:1 from the
    # object store into its own verified cache (nothing of it is on the nodes' disks yet)
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
    r = _cli(env, "submit", _job_yaml(work, "digits-dpo", dpo, {"init_adapter": "demo/digits"},
                                      max_steps=4), "--follow")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    warm = registry.resolve("demo/digits-dpo")
    assert warm.hyperparameters["init_adapter"] == "demo/digits:1"
    assert warm.metrics["world_size"] == 2 and warm.metrics["method"] == "dpo"
    first = next(iter(jobs.iter_events(registry.catalog, job_id=str(warm.job_id),
                                       kinds=["metrics"])))  # fmt: skip
    assert abs(first.data["loss"] - 0.6931471805599453) < 1e-5  # reference = the start, frozen
    registry.catalog.dispose()


def test_jobs_queued_together_train_as_one_pack_on_private_nodes(stack) -> None:  # type: ignore[no-untyped-def]
    """Two jobs admitted in one tick — one supervised, one DPO — train as one pack on two
    private nodes: each node's workers read the base and both jobs' data only from what they
    downloaded themselves."""
    from storage.catalog import repository as repo

    env, _, work = stack
    base_dir = _client_files(work)
    assert _cli(env, "base", "register", "tiny", base_dir).returncode == 0
    registry = Registry.from_settings(load_settings(env))
    db = registry.catalog
    repo.ensure_namespace(db, name="demo")
    repo.set_namespace_limits(db, namespace="demo", max_cpus=0)  # hold both in the queue
    try:
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
        for name, seed, method in (("pack-a", 1, None), ("pack-b", 2, dpo)):
            r = _cli(env, "submit", _job_yaml(work, name, method, max_steps=12, seed=seed))
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        ids = [j.id for j in jobs.list_jobs(db, namespace="demo", states={"queued"})]
        assert len(ids) == 2
    finally:
        repo.set_namespace_limits(db, namespace="demo")  # lifted: one tick admits both
    wait_until(lambda: all(jobs.get_job(db, job_id=j).state in ("succeeded", "failed")
                           for j in ids), timeout_s=300, what="the packed jobs to end")  # fmt: skip
    done = [jobs.get_job(db, job_id=j) for j in ids]
    assert [j.state for j in done] == ["succeeded"] * 2, [j.error for j in done]
    (pack_id,) = {j.pack_id for j in done}
    assert pack_id is not None
    for name in ("pack-a", "pack-b"):
        lineage = registry.resolve(f"demo/{name}").metrics["pack"]
        assert lineage["id"] == pack_id and lineage["jobs"] == 2
    dpo_version = registry.resolve("demo/pack-b")
    assert dpo_version.metrics["method"] == "dpo" and dpo_version.metrics["world_size"] == 2
    assert 0.0 <= dpo_version.metrics["rewards/accuracies"] <= 1.0
    r = _cli(env, "jobs", "list", "--packs", "-o", "json")
    shown = {p["id"]: p for p in json.loads(r.stdout)}
    assert shown[pack_id]["state"] == "closed" and shown[pack_id]["slots"]["used"] == 0
    assert pack_id in _cli(env, "jobs", "show", ids[0]).stdout
    registry.catalog.dispose()


def test_a_dead_node_resumes_elsewhere_from_the_object_store(stack) -> None:  # type: ignore[no-untyped-def]
    from workers.base_model import load_base
    from workers.datasets import load_dataset
    from workers.lora import LoraConfig
    from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

    env, cluster, work = stack
    base_dir = _client_files(work)
    assert _cli(env, "base", "register", "tiny", base_dir).returncode == 0
    steps, every = 60, 10
    r = _cli(env, "submit", _job_yaml(work, "sturdy", max_steps=steps, checkpoint_every=every))
    assert r.returncode == 0, r.stdout + r.stderr
    registry = Registry.from_settings(load_settings(env))
    job_id = next(j.id for j in jobs.list_jobs(registry.catalog, namespace="demo")
                  if j.name == "sturdy")  # fmt: skip

    def steps_seen() -> list[int]:
        return [e.data["step"] for e in jobs.list_events(registry.catalog, job_id=job_id)
                if e.kind == "metrics"]  # fmt: skip

    wait_until(lambda: max(steps_seen(), default=0) >= every + 5, timeout_s=300,
               what="a checkpoint and some steps past it")  # fmt: skip
    victim = node_running(cluster, b"RayTrainWorker")  # a node with a training worker
    assert victim is not None
    before = max(steps_seen())
    kill_node(victim)  # every process of that node, as when a machine dies
    wait_until(lambda: jobs.get_job(registry.catalog, job_id=job_id).state in
               ("succeeded", "failed"), timeout_s=420, what="the job to end")  # fmt: skip
    job = jobs.get_job(registry.catalog, job_id=job_id)
    assert job.state == "succeeded", job.error
    assert job.attempts == 1  # Ray Train owned the restart; the runner was never lost
    resumed = [e.data["from_step"] for e in jobs.list_events(registry.catalog, job_id=job_id)
               if e.kind == "resumed"]  # fmt: skip
    assert resumed and resumed[0] >= every and resumed[0] % every == 0
    assert before - resumed[0] <= every + 1  # steps lost ≤ checkpoint_every (+ the one in flight)
    version = registry.resolve("demo/sturdy")
    # the same final loss as an uninterrupted run (2 workers × 4 = one process × 8)
    model, tok = load_base(base_dir)
    recipe = LoraFinetuneRecipe(
        model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        TrainConfig(max_steps=steps, batch_size=8, seq_len=64, eval_every=0, lr=3e-3,
                    warmup_steps=10),
        pad_id=tok.pad_token_id,
    )  # fmt: skip
    recipe.setup()
    reference = recipe.train(load_dataset(work / "data" / "train.jsonl", tok, seq_len=64)).curve
    final = [e.data for e in jobs.list_events(registry.catalog, job_id=job_id)
             if e.kind == "metrics" and e.data["step"] == steps][-1]  # fmt: skip
    assert abs(final["loss"] - reference[-1].loss) < 1e-4, (final, reference[-1])
    assert version.job_id == job_id
    registry.catalog.dispose()
