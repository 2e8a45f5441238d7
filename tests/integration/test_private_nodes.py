"""Private Ray nodes (``infra.private_nodes``) share no disk, as separate machines would.

A head and two 1-CPU nodes, each started by ``ray start`` in its own mount namespace. A driver
in a subprocess (``ray.init`` is per process, and this session may hold another cluster)
pins tasks to each node: what node 1 writes to its home, ``/tmp`` or ``/dev/shm`` node 2 does
not see, nor a file the test wrote in its own (hidden) directory; a large object still travels
from the driver through each node's private ``/dev/shm``. Then node 2 is killed (every one of
its processes, SIGKILL) and Ray reports it dead while node 1 keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from infra.private_nodes import (
    PrivateNode,
    can_isolate,
    cluster_processes,
    kill_node,
    private_cluster,
    ray_node_id,
)
from infra.servers import wait_until

REPO = Path(__file__).resolve().parents[2]
# Ray's GCS declares a silent node dead after period × threshold (about 2 s instead of 15 s).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}

pytestmark = pytest.mark.skipif(
    not can_isolate(), reason="needs root (CAP_SYS_ADMIN) to mount in a new mount namespace"
)


@pytest.fixture()
def client_dir() -> Iterator[Path]:
    """The user's working directory, which no node may read; outside /tmp, like a real one
    (each node's private /tmp would hide pytest's tmp_path even without ``hide``)."""
    path = Path(tempfile.mkdtemp(prefix="lorafleet-client-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_nodes_share_no_disk_and_die_alone(client_dir: Path) -> None:
    secret = client_dir / "secret.txt"
    secret.write_text("client only")
    env = {**os.environ, **FAST_HEALTH_CHECKS}
    with private_cluster(env, workers=2, cpus=1, hide=[client_dir]) as cluster:
        assert {p for n in cluster.nodes for p in n.processes()} == set(cluster.processes())
        spec = {
            "address": cluster.address,
            "nodes": [{**asdict(n), "home": str(n.home)} for n in cluster.workers],
            "client_file": str(secret),
        }
        driver_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        run = subprocess.run(
            [sys.executable, "-m", "tests.integration.test_private_nodes", json.dumps(spec)],
            cwd=REPO, env=driver_env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])

        one, two = seen["node-1"], seen["node-2"]
        assert two["sees"] == {"home": False, "tmp": False, "shm": False, "client_file": False}
        assert one["sees"]["client_file"] is False and secret.read_text() == "client only"
        assert one["home"] == str(cluster.workers[0].home) != two["home"]
        assert not Path(one["home"]).exists()  # node 1's home is not on the client's disk either
        assert two["own_files"] == ["from-node-2.txt"]  # its own home works, holds only its file
        assert one["big_sum"] == two["big_sum"] == seen["big_sum"]  # via each private /dev/shm
        assert seen["node-2 dead"] and seen["node-1 after"] == one["home"]
        assert cluster.workers[1].processes() == []
        assert cluster.head.processes() and cluster.workers[0].processes()
    assert cluster_processes(cluster.id) == []


def _driver(spec: dict[str, Any]) -> dict[str, Any]:
    """The checks, from a driver process on the client machine; returns what it saw."""
    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [PrivateNode(**{**n, "home": Path(n["home"])}) for n in spec["nodes"]]
    tag = uuid.uuid4().hex

    @ray.remote(num_cpus=1, max_retries=0)
    def write_and_look(name: str, big: Any, paths: dict[str, str]) -> dict[str, Any]:
        home = Path(os.environ["LORAFLEET_HOME"])
        mine = {
            "home": home / f"from-{name}.txt",
            "tmp": Path(f"/tmp/lorafleet-{tag}-{name}.txt"),
            "shm": Path(f"/dev/shm/lorafleet-{tag}-{name}"),
        }
        sees = {key: Path(path).exists() for key, path in paths.items()}  # before writing
        for path in mine.values():
            path.write_text(name)
        return {
            "home": str(home),
            "sees": sees,
            "written": {key: str(path) for key, path in mine.items()},
            "own_files": sorted(p.name for p in home.iterdir()),
            "big_sum": float(big.sum()),
        }

    @ray.remote(num_cpus=1, max_retries=0)
    def home() -> str:
        return os.environ["LORAFLEET_HOME"]

    ray.init(address=spec["address"], logging_level="ERROR", log_to_driver=False)
    try:
        ids = {n.name: ray_node_id(n) for n in nodes}

        def on(name: str) -> NodeAffinitySchedulingStrategy:
            return NodeAffinitySchedulingStrategy(ids[name], soft=False)

        big = np.arange(8_000_000, dtype=np.float64)  # 64 MB: through plasma, not inlined
        big_ref = ray.put(big)
        seen: dict[str, Any] = {"big_sum": float(big.sum())}
        client = {"client_file": spec["client_file"]}
        seen["node-1"] = ray.get(
            write_and_look.options(scheduling_strategy=on("node-1")).remote(
                "node-1", big_ref, client
            )
        )
        node_1_wrote = {**seen["node-1"]["written"], **client}
        seen["node-2"] = ray.get(
            write_and_look.options(scheduling_strategy=on("node-2")).remote(
                "node-2", big_ref, node_1_wrote
            )
        )

        kill_node(nodes[1])

        def node_2_dead() -> bool:
            return not next(n["Alive"] for n in ray.nodes() if n["NodeID"] == ids["node-2"])

        wait_until(node_2_dead, timeout_s=30, what="Ray to report node-2 dead")
        seen["node-2 dead"] = True
        seen["node-1 after"] = ray.get(home.options(scheduling_strategy=on("node-1")).remote())
        return seen
    finally:
        ray.shutdown()


if __name__ == "__main__":  # the driver: python -m tests.integration.test_private_nodes SPEC
    print(json.dumps(_driver(json.loads(sys.argv[1]))))
