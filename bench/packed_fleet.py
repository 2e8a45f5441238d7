"""Packed training through the scheduler: 4 jobs × 100 steps on one base, three ways.

- ``sequential``: one job after another (namespace limit 1, packing off), each its own worker
  group and start-up;
- ``side_by_side``: 4 separate worker groups at once (packing off);
- ``packed``: the 4 jobs submitted together train as one pack (one worker group, one base).

Each round runs the three in turn (sequential, side by side, packed, …; ≥ 5 rounds) on one
local Ray instance with 4 logical CPUs (this machine has 2 cores: side by side oversubscribes
them, as a cluster that admits by CPU count would). Wall time is first submit → last job
succeeded. Memory is the peak Σ PSS of the Ray Train worker processes while the jobs run
(sampled every 0.2 s), packed vs side by side. Ratios are per round, reported as the median
with min–max.

    python bench/packed_fleet.py [--rounds 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

JOBS = 4
SYSTEMS = ("sequential", "side_by_side", "packed")


def _train_workers() -> list[int]:
    """Pids of the Ray Train worker processes now."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in title:
            pids.append(int(proc.name))
    return pids


class PssPeak:
    """The peak of Σ PSS over the Ray Train workers, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.most_workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from workers.training.shared_base import pss_bytes

        while not self._stop.is_set():
            total, n = 0, 0
            for pid in _train_workers():
                try:
                    total += pss_bytes(pid)
                    n += 1
                except OSError:
                    continue  # ended between the listing and the read
            self.peak = max(self.peak, total)
            self.most_workers = max(self.most_workers, n)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run_system(system: str, registry: Any, data_id: str, steps: int, tag: str) -> dict[str, Any]:
    from orchestrator.service import submit_job
    from orchestrator.spec import parse_spec
    from storage.catalog import jobs
    from storage.catalog import repository as repo

    ns = f"{system.replace('_', '-')}-{tag}"
    if system == "sequential":
        repo.ensure_namespace(registry.catalog, name=ns)
        repo.set_namespace_limits(registry.catalog, namespace=ns, max_concurrent_jobs=1)
    ids = []
    with PssPeak() as pss:
        t0 = time.perf_counter()
        for i in range(JOBS):
            spec = parse_spec({
                "name": f"j{i}", "namespace": ns, "base_model": "bench",
                "training_data": data_id, "output_adapter": f"{ns}/j{i}",
                "packing": system == "packed",
                "lora": {"r": 8, "targets": ["q_proj", "v_proj"]},
                "training": {"max_steps": steps, "batch_size": 4, "seq_len": 64, "seed": i,
                             "eval_every": 0, "warmup_steps": 5},
            })  # fmt: skip
            ids.append(submit_job(registry.catalog, spec).job.id)
        while True:
            states = [jobs.get_job(registry.catalog, job_id=j).state for j in ids]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    if any(s != "succeeded" for s in states):
        raise RuntimeError(f"{system}: jobs ended {states}")
    packs = {jobs.get_job(registry.catalog, job_id=j).pack_id for j in ids}
    return {"wall_s": wall, "peak_pss_bytes": pss.peak, "most_workers": pss.most_workers,
            "packs": len(packs - {None})}  # fmt: skip


def bench(rounds: int, steps: int) -> dict[str, Any]:
    import ray

    from orchestrator.scheduler import SchedulerCore, SchedulerLoop, ray_hooks
    from orchestrator.uploads import upload_dataset
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.demo_task import TRAIN_FILE
    from workers.tiny_base import TinySpec, create_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = create_tiny_base(work / "base", TinySpec(layers=4, hidden=256, heads=4, vocab=2048))
        settings = load_settings({"LORAFLEET_HOME": str(work / "home")})
        registry = Registry.from_settings(settings)
        registry.register_base(name="bench", path=base)
        ray.init(address="local", num_cpus=JOBS, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)  # fmt: skip
        loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.2).start()
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        try:
            for r in range(rounds):
                for system in SYSTEMS:
                    ns = f"{system.replace('_', '-')}-r{r}"
                    record, _ = upload_dataset(
                        registry, TRAIN_FILE, namespace=ns, filename=TRAIN_FILE.name,
                        max_bytes=1 << 30,
                    )  # fmt: skip
                    out = _run_system(system, registry, record.id, steps, f"r{r}")
                    runs[system].append(out)
                    print(f"round {r} {system}: {out['wall_s']:.1f} s, peak Σ PSS "
                          f"{out['peak_pss_bytes'] / 2**20:.0f} MiB over {out['most_workers']} "
                          f"worker(s), {out['packs']} pack(s)", flush=True)  # fmt: skip
        finally:
            loop.stop()
            ray.shutdown()

    def ratios(a: str, b: str, key: str) -> dict[str, float]:
        values = [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)]
        return {"median": median(values), "min": min(values), "max": max(values)}

    return {
        "jobs": JOBS,
        "steps": steps,
        "rounds": rounds,
        "runs": runs,
        "wall_packed_over_sequential": ratios("packed", "sequential", "wall_s"),
        "wall_packed_over_side_by_side": ratios("packed", "side_by_side", "wall_s"),
        "pss_packed_over_side_by_side": ratios("packed", "side_by_side", "peak_pss_bytes"),
        "median_wall_s": {s: median([x["wall_s"] for x in runs[s]]) for s in SYSTEMS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = bench(args.rounds, args.steps)
    result["environment"] = environment(1)
    path = write_result("packed_fleet", result)
    for key in ("wall_packed_over_sequential", "wall_packed_over_side_by_side",
                "pss_packed_over_side_by_side"):  # fmt: skip
        r = result[key]
        print(f"{key}: {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
