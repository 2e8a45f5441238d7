"""Integration fixtures: moto S3 and PostgreSQL servers shared per session, fresh state per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from infra.servers import MotoS3, fresh_database, postgres_server, require_postgres
from storage.cache import AdapterCache
from storage.catalog.db import open_catalog
from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore
from storage.registry import Registry

NODE_ADMIN_TOKEN = (
    "admin-secret-of-the-test-nodes"  # the admin token in every Ray node's own environment
)
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "lorafleet-test", "AWS_SECRET_ACCESS_KEY": "lorafleet-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        if url is None:
            if require_postgres():
                pytest.fail("LORAFLEET_REQUIRE_POSTGRES is set but no PostgreSQL is reachable")
            pytest.skip("no PostgreSQL server reachable (set LORAFLEET_TEST_POSTGRES_URL)")
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog database of each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    server = request.getfixturevalue("pg_server")
    with fresh_database(server) as url:
        yield url


def make_s3_store(moto: MotoS3, prefix: str = "team-store") -> S3ObjectStore:
    store = S3ObjectStore(f"lf-{uuid.uuid4().hex[:10]}", prefix, endpoint_url=moto.endpoint)
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty object store of each backend."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    return make_s3_store(request.getfixturevalue("moto_s3"))


@pytest.fixture(params=["sqlite+local", "postgresql+s3"])
def registry(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_base_dir: Path
) -> Iterator[Registry]:
    """A registry on the embedded engines and on the organisation engines, base registered."""
    if request.param == "sqlite+local":
        url_cm = None
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        store: ObjectStore = LocalObjectStore(tmp_path / "objects")
    else:
        url_cm = fresh_database(request.getfixturevalue("pg_server"))
        url = url_cm.__enter__()
        store = make_s3_store(request.getfixturevalue("moto_s3"))
    catalog = open_catalog(url, auto_upgrade=True)
    reg = Registry(catalog, store, AdapterCache(tmp_path / "cache"))
    reg.register_base(name="tiny", path=tiny_base_dir)
    try:
        yield reg
    finally:
        catalog.dispose()
        if url_cm is not None:
            url_cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """Two simulated nodes × 2 CPUs (own raylet and object store each), one per test session.

    The head has no CPUs, so every training worker lands on a worker node: 4 workers are
    2 per node, as on two real machines.
    """
    import ray
    from ray.cluster_utils import Cluster

    # each node's own secrets, as a deployment mounts them: nothing sends them to a node
    node_env = {"LORAFLEET_API_TOKEN": NODE_ADMIN_TOKEN, **FAKE_AWS}  # S3 credentials too
    with mock.patch.dict(os.environ, node_env):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False},
        )
        for _ in range(2):
            cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
