"""The quickstart flow on a production-like stack: 2 Ray nodes from ``ray start``, PostgreSQL,
SeaweedFS S3 — configuration alone switches the engines."""

from __future__ import annotations

import json
from pathlib import Path

import boto3

from infra.local_stack import local_stack, run_quickstart, stack_processes
from storage.registry import Registry
from storage.settings import load_settings


def test_quickstart_flow_on_ray_cluster_postgres_and_seaweedfs(tmp_path: Path) -> None:
    with local_stack(tmp_path) as env:
        run = run_quickstart(env, 150)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "quickstart passed" in run.stdout
        result = json.loads((tmp_path / "home" / "quickstart" / "result.json").read_text())
        assert result["job_state"] == "succeeded" and result["served_equals_local"] is True
        assert result["adapter_exact_match"] > result["base_exact_match"]

        settings = load_settings(env)
        assert settings.catalog_url.startswith("postgresql")
        registry = Registry.from_settings(settings)
        version = registry.resolve(result["adapter"])
        assert version.state == "ready" and version.metrics["nodes"] == 2  # one worker per node
        s3 = boto3.client("s3", endpoint_url=env["LORAFLEET_S3_ENDPOINT"], region_name="us-east-1")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lorafleet-demo")["Contents"]}
        for f in version.files:
            assert f"lorafleet/{version.object_prefix}/{f.name}" in keys
        registry.catalog.dispose()
        stack_id = env["LORAFLEET_STACK_ID"]
        assert stack_processes(stack_id)  # the Ray nodes are up while the stack is
    assert stack_processes(stack_id) == []  # and gone after it
