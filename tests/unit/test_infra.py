"""infra/ manifests are valid and agree with the code: images, ports, env names, import paths.

No cluster needed: every file is parsed and cross-checked against the configuration keys
(``storage.settings``), the serving defaults and the package's Serve application builders.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from storage.settings import ENV_KEYS, load_settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
AWS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _by_kind(name: str, kind: str) -> dict[str, Any]:
    return next(d for d in _docs(name) if d["kind"] == kind)


def _image_tag() -> str:
    m = re.search(r"docker build .* -t (\S+) \.", (INFRA / "docker/Dockerfile.worker").read_text())
    assert m, "the Dockerfile names the tag it is built as"
    return m.group(1)


def _pods(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _cluster_specs() -> list[dict[str, Any]]:
    return [
        _by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"],
        _by_kind("kuberay/rayservice.yaml", "RayService")["spec"]["rayClusterConfig"],
    ]


def test_config_names_only_settings_the_code_reads() -> None:
    cm = _by_kind("kuberay/config.yaml", "ConfigMap")["data"]
    secret = _by_kind("kuberay/config.yaml", "Secret")["stringData"]
    known = set(ENV_KEYS.values()) | AWS
    assert set(cm) | set(secret) <= known
    assert {"LORAFLEET_CATALOG_URL", "LORAFLEET_API_TOKEN"} <= set(secret)  # secrets stay secret
    assert "LORAFLEET_OBJECT_STORE" in cm
    settings = load_settings({**cm, **secret})  # the values parse as our settings
    assert settings.catalog_url.startswith("postgresql+psycopg://")
    assert settings.object_store.startswith("s3://")


@pytest.mark.parametrize("spec", _cluster_specs(), ids=["raycluster", "rayservice"])
def test_every_pod_runs_our_image_with_our_config(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == ray.__version__
    for pod in _pods(spec):
        for c in pod["containers"]:
            assert c["image"] == _image_tag()
            refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
            assert refs == {"lorafleet-config", "lorafleet-secrets"}
            assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1


def test_raycluster_has_cpu_and_gpu_groups_and_the_head_ports() -> None:
    spec = _by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"]
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} == {"cpu", "gpu"}
    ports = {p["name"]: p["containerPort"] for p in
             spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
    assert ports["gcs"] == 6379 and ports["client"] == 10001


def test_rayservice_applications_import_and_their_args_validate() -> None:
    from workers.serving.app import AppArgs
    from workers.serving.deployments import start

    spec = _by_kind("kuberay/rayservice.yaml", "RayService")["spec"]
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    port = inspect.signature(start).parameters["port"].default
    assert serve_cfg["http_options"]["port"] == port == 8000
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": port, "name": "serve"} in head["ports"]
    apps = {a["name"]: a for a in serve_cfg["applications"]}
    assert set(apps) == {"lorafleet", "lorafleet-api"}
    for app in apps.values():
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    AppArgs.model_validate(apps["lorafleet"]["args"])
    assert apps["lorafleet-api"]["route_prefix"] == "/api"


def test_ray_up_cluster_uses_the_image_and_known_node_types() -> None:
    cfg = yaml.safe_load((INFRA / "ray-up/cluster.yaml").read_text())
    assert cfg["docker"]["image"] == _image_tag()
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert {"cpu", "gpu"} <= set(cfg["available_node_types"])
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    text = (INFRA / "ray-up/cluster.yaml").read_text()
    named = set(re.findall(r"\b(LORAFLEET_[A-Z_]+)=", text))
    assert named and named <= set(ENV_KEYS.values())
    assert "--port=6379" in " ".join(cfg["head_start_ray_commands"])


def test_compose_stack_matches_the_example_configuration(tmp_path: Path) -> None:
    text = (INFRA / "compose/docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)["services"]
    pg, minio = compose["postgres"]["environment"], compose["minio"]
    example = INFRA / "lorafleet.toml.example"
    # the documented URL, with the password the compose file takes from the environment
    documented = re.search(r"(postgresql\+psycopg://\S+)", example.read_text()).group(1)  # type: ignore[union-attr]
    settings = load_settings({"LORAFLEET_CONFIG": str(example), "LORAFLEET_HOME": str(tmp_path),
                              "LORAFLEET_CATALOG_URL": documented})  # fmt: skip
    user, db = pg["POSTGRES_USER"], pg["POSTGRES_DB"]
    assert pg["POSTGRES_PASSWORD"] == "${LORAFLEET_DB_PASSWORD:?set LORAFLEET_DB_PASSWORD}"
    assert settings.catalog_url == (
        f"postgresql+psycopg://{user}:$LORAFLEET_DB_PASSWORD@127.0.0.1:5432/{db}"
    )
    # no fixed password anywhere, nothing published beyond this machine
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    assert "lorafleet-secret" not in text and "PASSWORD: lorafleet" not in text
    ports = [p for svc in compose.values() for p in svc.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    active = [ln for ln in example.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not any(k in ln for ln in active for k in ("catalog_url", "api_token"))  # no secrets
    assert settings.s3_endpoint == "http://127.0.0.1:9000"
    bucket = settings.object_store.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in compose["create-bucket"]["entrypoint"]


def test_worker_image_is_cuda_and_pins_our_torch() -> None:
    text = (INFRA / "docker/Dockerfile.worker").read_text()
    makefile = (INFRA.parent / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH := (\S+)", makefile, re.M).group(1)  # type: ignore[union-attr]
    assert f'"{torch_pin}"' in text
    ray_image = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\S+)", text).group(1)  # type: ignore[union-attr]
    assert ray_image.startswith(ray.__version__) and "-cu" in ray_image
    for package in ("orchestrator", "workers", "storage"):
        assert f"COPY --chown=ray:users {package} ./{package}" in text
