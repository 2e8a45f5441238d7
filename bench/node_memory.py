"""Node memory of K workers sharing the frozen base vs K private copies, and bytes on the wire.

On one node, K = 2 and 4 Ray Train workers set up a hidden-512, 4-layer base (~69 MB fp32) either
with ``shared_memory`` placement (one /dev/shm file mapped read-only by all) or ``private``
(each worker holds its own copy). Memory is the summed PSS growth of the workers from before
set-up to the end of training, when every page has been touched (PSS splits shared pages
among the processes that map them; RSS would count them K times).

    base counted   = Σ over workers of the PSS of their mappings of the base file / base bytes
                     (shared target ≤ 1.1: the node holds the base once)
    Σ PSS growth   = what the workers added in all (base + activations, optimizer, runtime)

Also reported: bytes all-reduced per step / LoRA gradient bytes (target ≤ 1.05).

    python bench/node_memory.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")

from bench.common import environment, write_result


def main() -> None:
    import ray

    from workers.demo_task import TRAIN_FILE
    from workers.lora import LoraConfig
    from workers.tiny_base import TinySpec, create_tiny_base
    from workers.training.distributed_spec import DistributedSpec
    from workers.training.ray_train import train_distributed
    from workers.training.recipe import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="lorafleet-nodemem-"))
    base = create_tiny_base(work / "base", TinySpec(layers=4, hidden=512, heads=8))
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    results: dict[str, Any] = {"environment": environment(threads=1), "runs": {}}
    try:
        for k in (2, 4):
            for placement in ("shared_memory", "private"):
                spec = DistributedSpec(
                    job_name=f"nodemem-{uuid.uuid4().hex[:6]}",
                    base_dir=str(base),
                    data_path=str(TRAIN_FILE),
                    out_dir=str(work / f"out-{k}-{placement}"),
                    storage_path=str(work / "ray"),
                    store={"uri": (work / "objects").as_uri()},
                    lora=LoraConfig(r=8),
                    train=TrainConfig(max_steps=3, batch_size=2, seq_len=64, eval_every=0),
                    workers=k,
                    base_placement=placement,  # type: ignore[arg-type]
                )
                m = train_distributed(spec).metrics
                workers = m["workers"]
                base_bytes = workers[0]["base_param_bytes"]
                growth = sum(w["pss_after_training"] - w["pss_before_setup"] for w in workers)
                wire = [p["allreduce_bytes"] / m["lora_grad_bytes"] for p in m["curve"]]
                mapped = sum(w["base_mapping_pss"] for w in workers)
                run = {
                    "workers": k,
                    "base_mapping_pss_over_base": mapped / base_bytes,
                    "base_bytes": base_bytes,
                    "pss_growth_bytes": growth,
                    "base_counted": growth / base_bytes,
                    "max_private_peak_growth_over_base": max(
                        w["private_peak_growth_setup"] for w in workers
                    )
                    / base_bytes,
                    "allreduce_over_lora_bytes": max(wire),
                }
                results["runs"][f"K={k} {placement}"] = run
                print(
                    f"K={k} {placement:13s}: Σ PSS growth {growth / 2**20:7.1f} MiB = base × "
                    f"{run['base_counted']:.2f}; mapped base file Σ PSS = base × "
                    f"{mapped / base_bytes:.3f}; all-reduce / LoRA bytes {max(wire):.4f}"
                )
            shared = results["runs"][f"K={k} shared_memory"]
            private = results["runs"][f"K={k} private"]
            results["runs"][f"K={k} ratio"] = {
                "private_over_shared": private["pss_growth_bytes"] / shared["pss_growth_bytes"]
            }
            print(
                f"K={k}: private copies use "
                f"{private['pss_growth_bytes'] / shared['pss_growth_bytes']:.2f}× the memory "
                "of the shared base"
            )
        for placement in ("shared_memory", "private"):
            two = results["runs"][f"K=2 {placement}"]
            four = results["runs"][f"K=4 {placement}"]
            marginal = (four["pss_growth_bytes"] - two["pss_growth_bytes"]) / 2
            results["runs"][f"marginal {placement}"] = {
                "bytes_per_extra_worker": marginal,
                "base_per_extra_worker": marginal / four["base_bytes"],
            }
            print(
                f"{placement}: each extra worker adds {marginal / 2**20:.1f} MiB "
                f"= base × {marginal / four['base_bytes']:.2f}"
            )
    finally:
        ray.shutdown()
    print(f"wrote {write_result('node_memory', results)}")


if __name__ == "__main__":
    main()
