"""Resume on another node: steps lost when a worker node dies mid-job.

A head and ``rounds + 2`` worker nodes, each in its own mount namespace (``infra.private_nodes``:
nodes share only PostgreSQL and SeaweedFS S3), run 2-node jobs (one worker per node,
checkpoint every N steps). In each round a job is submitted with ``lorafleet submit``, the
node of one of its training workers is killed outright (every process, as when a machine dies)
at a different step, and the job resumes on the remaining nodes from the newest checkpoint in
the object store. Steps lost = the last step reported before the kill − the step the job
resumed from (target: ≤ ``checkpoint_every``); also the seconds from the kill to the first
step after it.

    python bench/resume.py [--rounds 3] [--every 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result
from infra.local_stack import cluster_stack
from infra.private_nodes import kill_node, node_running
from infra.servers import wait_until
from storage.catalog import jobs
from storage.registry import Registry
from storage.settings import load_settings
from workers.demo_task import TRAIN_FILE

FAST_HEALTH = {  # node death noticed in ~2 s instead of Ray's default ~15 s
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}


def _cli(env: dict[str, str], *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900, check=True)  # fmt: skip


def _round(
    env: dict[str, str], cluster: Any, registry: Registry, work: Path, i: int, every: int
) -> dict[str, Any]:
    """Submit a 2-node job, kill a node of it past a checkpoint, measure the resume."""
    kill_at = every + 3 + 4 * i  # a different distance past a checkpoint each round
    spec = {"name": f"resume-{i}", "namespace": "bench", "base_model": "tiny",
            "training_data": str(work / "train.jsonl"), "output_adapter": f"bench/r{i}",
            "training": {"max_steps": 3 * every, "batch_size": 4, "seq_len": 64,
                         "eval_every": 0, "checkpoint_every": every},
            "resources": {"nodes": 2, "workers_per_node": 1}, "max_failures": 2}  # fmt: skip
    (work / f"r{i}.yaml").write_text(yaml.safe_dump(spec))
    _cli(env, "submit", work / f"r{i}.yaml")
    job_id = next(j.id for j in jobs.list_jobs(registry.catalog, namespace="bench")
                  if j.name == f"resume-{i}")  # fmt: skip

    def steps() -> list[int]:
        return [e.data["step"] for e in jobs.list_events(registry.catalog, job_id=job_id)
                if e.kind == "metrics"]  # fmt: skip

    def ended() -> bool:
        return jobs.get_job(registry.catalog, job_id=job_id).state in ("succeeded", "failed")

    wait_until(lambda: max(steps(), default=0) >= kill_at, timeout_s=600, what="steps")
    victim = node_running(cluster, b"RayTrainWorker")
    assert victim is not None, "no training worker found on a worker node"
    before, seen = max(steps()), len(steps())
    t_kill = time.monotonic()
    kill_node(victim)
    wait_until(lambda: len(steps()) > seen, timeout_s=600, what="a step after the kill")
    first_after_s = time.monotonic() - t_kill
    wait_until(ended, timeout_s=900, what="the job to end")
    job = jobs.get_job(registry.catalog, job_id=job_id)
    resumed = [e.data["from_step"] for e in jobs.list_events(registry.catalog, job_id=job_id)
               if e.kind == "resumed"]  # fmt: skip
    r = {"state": job.state, "attempts": job.attempts, "killed_node": victim.name,
         "killed_at_step": before, "resumed_from_step": resumed[0] if resumed else None,
         "steps_lost": before - resumed[0] if resumed else None,
         "kill_to_next_step_s": first_after_s}  # fmt: skip
    print(f"round {i + 1}: killed {victim.name} at step {before}, resumed from "
          f"{r['resumed_from_step']} → {r['steps_lost']} steps lost, next step after "
          f"{first_after_s:.1f} s, job {job.state}")  # fmt: skip
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every", type=int, default=10, help="checkpoint_every")
    args = ap.parse_args()
    from workers.tiny_base import create_tiny_base

    os.environ.update(FAST_HEALTH)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-resume-"))
    # Each kill takes a node away for good, and the last round's job still needs two nodes
    # after its kill (it would wait for capacity, as on a cluster without an autoscaler).
    with cluster_stack(work, workers=args.rounds + 2, cpus=1) as (env, cluster):
        create_tiny_base(work / "base")
        shutil.copy(TRAIN_FILE, work / "train.jsonl")
        _cli(env, "base", "register", "tiny", work / "base")
        registry = Registry.from_settings(load_settings(env))
        rounds = [_round(env, cluster, registry, work, i, args.every) for i in range(args.rounds)]
        registry.catalog.dispose()
    shutil.rmtree(work, ignore_errors=True)
    lost = [r["steps_lost"] for r in rounds if r["steps_lost"] is not None]
    result = {
        "environment": environment(threads=1),
        "checkpoint_every": args.every,
        "rounds": rounds,
        "steps_lost_max": max(lost) if lost else None,
        "kill_to_next_step_s_median": median([r["kill_to_next_step_s"] for r in rounds]),
    }
    print(f"steps lost: max {result['steps_lost_max']} (checkpoint_every {args.every}); kill → "
          f"next step {result['kill_to_next_step_s_median']:.1f} s median")  # fmt: skip
    print(f"wrote {write_result('resume', result)}")


if __name__ == "__main__":
    main()
