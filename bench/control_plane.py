"""Control-plane overhead: submit → first training step vs the bare train function, and
admission throughput with 1,000 queued jobs.

1. The same 2-worker job is run (a) by calling ``train_distributed`` directly and (b) by
   submitting it to the catalog with a scheduler loop running. Latency = time from the call
   (or the submit) to the first per-step metrics event. Ratio = orchestrated / bare
   (target ≤ 1.2).
2. ``decide`` over 1,000 queued jobs from 20 namespaces on a 16-node cluster (pure), and a
   full ``SchedulerCore.tick`` (catalog reads, decision, status updates) with 1,000 queued
   jobs in SQLite and no free resources.
3. The REST API (``lorafleet server``, its own process) on PostgreSQL holding 100 and 100,000
   jobs: 64 concurrent clients (50 % list pages, 20 % submit, 20 % event streams of finished
   jobs, 10 % show) for 60 s each: requests/s, p50/p99, errors. Then page latency: the first
   page and a page deep behind a cursor, timed against both servers in paired rounds
   (A B A B …), median ratio 100,000 / 100 with its min–max (target ≤ 1.2).
4. Fuzzing: both HTTP apps' OpenAPI operations with valid and invalid requests (the CI test's
   generator, counted here): requests tried and 5xx answers (must be 0).

    python bench/control_plane.py [--only admission,latency,api,fuzz]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")

from bench.common import RESULTS, environment, median, write_result


def _first_metrics_ts(catalog: Any, job_id: str, timeout_s: float = 300) -> float:
    from storage.catalog import jobs

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for e in jobs.list_events(catalog, job_id=job_id):
            if e.kind == "metrics":
                return e.ts.timestamp()
        time.sleep(0.05)
    raise TimeoutError("no metrics event")


def bench_latency(work: Path, rounds: int) -> dict[str, Any]:
    import ray

    from orchestrator.runner import build_distributed_spec
    from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
    from orchestrator.service import submit_job
    from orchestrator.spec import parse_spec
    from storage.catalog import jobs
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.demo_task import TRAIN_FILE
    from workers.tiny_base import create_tiny_base
    from workers.training.ray_train import train_distributed

    base = create_tiny_base(work / "base")
    settings = load_settings({"LORAFLEET_HOME": str(work / "home")})
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=base)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    bare, orchestrated = [], []

    def spec(i: int, tag: str) -> Any:
        return parse_spec({"name": f"{tag}-{i}", "namespace": "bench", "base_model": "tiny",
                           "training_data": str(TRAIN_FILE), "output_adapter": f"bench/{tag}-{i}",
                           "training": {"max_steps": 3, "batch_size": 4, "seq_len": 64,
                                        "eval_every": 0},
                           "resources": {"workers_per_node": 2}})  # fmt: skip

    loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.2).start()
    try:
        for i in range(rounds):
            # (a) bare: the same distributed run the runner would build, called directly
            job = jobs.create_job(
                registry.catalog,
                namespace="bare",
                name=f"b{i}",
                spec=spec(i, "bare").model_dump(mode="json"),
            )[0]
            # cancelled at once: the scheduler must not run it; it only collects the events
            jobs.transition_job(
                registry.catalog, job_id=job.id, allowed_from={"queued"}, to="cancelled"
            )
            dspec = build_distributed_spec(job, settings, registry)
            t0 = time.time()
            train_distributed(dspec)
            bare.append(_first_metrics_ts(registry.catalog, job.id) - t0)
            # (b) orchestrated: submit and let the scheduler admit, start a runner, train
            t0 = time.time()
            sub = submit_job(registry.catalog, spec(i, "orch"))
            orchestrated.append(_first_metrics_ts(registry.catalog, sub.job.id) - t0)
            while jobs.get_job(registry.catalog, job_id=sub.job.id).state not in (
                "succeeded",
                "failed",
            ):
                time.sleep(0.2)
    finally:
        loop.stop()
        ray.shutdown()
    b, o = median(bare), median(orchestrated)
    return {
        "bare_first_step_s": b,
        "orchestrated_first_step_s": o,
        "ratio": o / b,
        "rounds": rounds,
    }


def bench_admission(work: Path) -> dict[str, Any]:
    from orchestrator.scheduler import ClusterHooks, SchedulerCore
    from orchestrator.scheduling import Gang, NodeFree, QueuedJob, decide
    from orchestrator.service import submit_job
    from orchestrator.spec import parse_spec
    from storage.catalog.db import open_catalog

    queued = [QueuedJob(f"j{i}", f"ns{i % 20}", i % 5, float(i), Gang(1, 2, 1.0, 0.0))
              for i in range(1000)]  # fmt: skip
    nodes = [NodeFree(cpus=8, total_cpus=8) for _ in range(16)]
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        decision = decide(queued, [], nodes)
    pure_s = (time.perf_counter() - t0) / reps

    catalog = open_catalog(f"sqlite:///{work / 'adm.db'}", auto_upgrade=True)
    for i in range(1000):
        submit_job(catalog, parse_spec({"name": f"j{i}", "namespace": f"ns{i % 20}",
                                        "base_model": "b", "training_data": "d",
                                        "output_adapter": f"ns{i % 20}/a{i}",
                                        "priority": i % 5}))  # fmt: skip
    hooks = ClusterHooks(start_runner=lambda _: None, runner_alive=lambda _: False,
                         kill_runner=lambda _: False, release=lambda _: 0,
                         nodes=lambda: [NodeFree(cpus=0, total_cpus=8)])  # fmt: skip
    core = SchedulerCore(catalog, hooks)
    core.tick()  # first tick writes 1,000 waiting reasons
    t0 = time.perf_counter()
    core.tick()
    tick_s = time.perf_counter() - t0
    return {
        "queued": 1000,
        "pure_decide_s": pure_s,
        "pure_decisions_per_s": 1000 / pure_s,
        "admitted_by_pure_decide": len(decision.admit),
        "full_tick_s": tick_s,
        "full_tick_decisions_per_s": 1000 / tick_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        default="admission,latency,api,fuzz",
        help="comma-separated parts to run (others keep their last results)",
    )
    parser.add_argument("--api-seconds", type=float, default=60.0)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="lorafleet-cp-"))
    path = RESULTS / "control_plane.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["environment"] = environment(threads=1)
    if "admission" in parts:
        results["admission"] = a = bench_admission(work)
        print(
            f"admission, 1,000 queued: decide() {a['pure_decisions_per_s']:,.0f} decisions/s; "
            f"full scheduler tick {a['full_tick_s'] * 1000:.0f} ms "
            f"({a['full_tick_decisions_per_s']:,.0f} decisions/s)"
        )
    if "latency" in parts:
        results["submit_to_first_step"] = lat = bench_latency(work, rounds=2)
        print(
            f"submit → first step: bare {lat['bare_first_step_s']:.2f} s, orchestrated "
            f"{lat['orchestrated_first_step_s']:.2f} s → ratio {lat['ratio']:.3f}×"
        )
    if "api" in parts:
        from bench.api_load import bench_api

        results["api"] = bench_api(work, seconds=args.api_seconds)
    if "fuzz" in parts:
        from bench.api_load import bench_fuzz

        results["fuzz"] = bench_fuzz(work)
    print(f"wrote {write_result('control_plane', results)}")


if __name__ == "__main__":
    main()
