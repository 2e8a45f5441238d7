"""Packing end to end, as a user sees it: 3 jobs × 60 steps on the tiny base, submitted
together (``lorafleet submit a.yaml b.yaml c.yaml --follow``: one pack) vs one after another
(``lorafleet submit X.yaml --follow`` three times), on a private-mount cluster (PostgreSQL,
SeaweedFS S3, a head and one private Ray node of 2 CPUs: ``infra.local_stack.cluster_stack``).

Wall time is first submit → last adapter published, as ``lorafleet submit`` users see it.
Each job's time is also split by its catalog events into phases, to find where the time that
``bench/packed_training.py``'s in-process figure does not see goes:

- ``queued``: submit → the scheduler starts it (``starting``);
- ``start``: ``starting`` → its first step (worker group start-up, base and data fetched into
  the node's cache, the pack's base placement, the initial evaluation);
- ``train``: first step → last step;
- ``finish``: last step → ``succeeded`` (final evaluation, save, staging, publish).

Paired rounds (sequential, packed, sequential, packed, …; ≥ 5); ratios per round, median with
min–max. Writes ``bench/results/packed_e2e.json``.

    python bench/packed_e2e.py [--rounds 5] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

JOBS = 3


def _cli(env: dict[str, str], *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900, check=True)  # fmt: skip


def _spec(work: Path, name: str, steps: int, seed: int) -> Path:
    import yaml

    from workers.demo_task import TRAIN_FILE

    spec = {"name": name, "namespace": "bench", "base_model": "tiny",
            "training_data": str(TRAIN_FILE), "output_adapter": f"bench/{name}",
            "training": {"max_steps": steps, "batch_size": 4, "seq_len": 64, "eval_every": 0,
                         "seed": seed}}  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _phases(db: Any, job_id: str) -> dict[str, float]:
    from storage.catalog import jobs

    events = list(jobs.iter_events(db, job_id=job_id))
    state = {e.data.get("state"): e.ts.timestamp() for e in events if e.kind == "state"}
    steps = [e.ts.timestamp() for e in events if e.kind == "metrics"]
    return {
        "queued": state["starting"] - state["queued"],
        "start": steps[0] - state["starting"],
        "train": steps[-1] - steps[0],
        "finish": state["succeeded"] - steps[-1],
        "total": state["succeeded"] - state["queued"],
    }


def _run(env: dict[str, str], work: Path, tag: str, steps: int, together: bool) -> dict[str, Any]:
    from storage.catalog import jobs
    from storage.registry import Registry
    from storage.settings import load_settings

    db = Registry.from_settings(load_settings(env)).catalog
    specs = [_spec(work, f"{tag}-{k}", steps, k) for k in range(JOBS)]
    t0 = time.perf_counter()
    if together:  # one command: queued in one go, admitted in one tick, one pack
        outputs = [_cli(env, "submit", *specs, "--follow").stdout]
    else:
        outputs = [_cli(env, "submit", spec, "--follow").stdout for spec in specs]
    ids = [part.split()[0] for out in outputs for part in out.split("submitted: ")[1:]]
    while not all(jobs.get_job(db, job_id=j).state in ("succeeded", "failed") for j in ids):
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    done = [jobs.get_job(db, job_id=j) for j in ids]
    if any(j.state != "succeeded" for j in done):
        raise RuntimeError(f"{tag}: {[j.error for j in done]}")
    phases = [_phases(db, j) for j in ids]
    db.dispose()
    return {"wall_s": wall, "packs": len({j.pack_id for j in done if j.pack_id}),
            "phases": {k: median([p[k] for p in phases]) for k in phases[0]}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from infra.local_stack import cluster_stack
    from workers.tiny_base import create_tiny_base

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-e2e-"))
    base = create_tiny_base(work / "tiny-base")
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "packed": []}
    with cluster_stack(work, workers=1, cpus=2) as (env, _cluster):
        _cli(env, "base", "register", "tiny", base)
        _run(env, work, "warm", 4, together=True)  # caches filled once, as a cluster in use
        for r in range(args.rounds):
            for system, together in (("sequential", False), ("packed", True)):
                runs[system].append(_run(env, work, f"{system[:3]}{r}", args.steps, together))
                print(system, json.dumps(runs[system][-1]), flush=True)
    ratio = [p["wall_s"] / s["wall_s"] for p, s in zip(runs["packed"], runs["sequential"],
                                                        strict=True)]  # fmt: skip
    result = {
        "environment": environment(1),
        "jobs": JOBS,
        "steps": args.steps,
        "rounds": args.rounds,
        "median_wall_s": {k: median([x["wall_s"] for x in v]) for k, v in runs.items()},
        "packed_over_sequential": {"median": median(ratio), "min": min(ratio), "max": max(ratio)},
        "median_phases_s": {
            k: {ph: median([x["phases"][ph] for x in v]) for ph in v[0]["phases"]}
            for k, v in runs.items()
        },
        "runs": runs,
    }
    path = write_result("packed_e2e", result)
    q = result["packed_over_sequential"]
    print(f"3 jobs packed / one after another, submit → published: {q['median']:.2f}× "
          f"({q['min']:.2f}–{q['max']:.2f}) → {path}")  # fmt: skip


if __name__ == "__main__":
    main()
