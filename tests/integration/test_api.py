"""API contract tests with httpx against the real app (SQLite catalog, local object store)."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.api import create_app
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, save_adapter

ADMIN = "admin-secret-token"


@pytest.fixture()
def api(tmp_path, tiny_base_dir, catalog_url):  # type: ignore[no-untyped-def]
    """The app on each catalog engine (SQLite and PostgreSQL)."""
    from storage.catalog.db import Catalog

    Catalog(catalog_url).upgrade()
    s = load_settings(
        {
            "LORAFLEET_HOME": str(tmp_path / "home"),
            "LORAFLEET_API_TOKEN": ADMIN,
            "LORAFLEET_CATALOG_URL": catalog_url,
        }
    )
    registry = Registry.from_settings(s)
    registry.register_base(name="tiny", path=tiny_base_dir)
    client = TestClient(create_app(s, registry))
    tokens = {ns: repo.create_token(registry.catalog, namespace=ns, name="t") for ns in ("a", "b")}
    return client, registry, tokens


def _h(token):  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {token}"}


def _body(ns="a", name="job", **extra):  # type: ignore[no-untyped-def]
    return {"name": name, "namespace": ns, "base_model": "tiny", "training_data": "d.jsonl",
            "output_adapter": f"{ns}/{name}", **extra}  # fmt: skip


def test_every_route_but_health_needs_a_token(api):
    client, _, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    for open_by_default in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(open_by_default).status_code in (401, 404)
    schema = client.get("/v1/openapi.json", headers=_h(ADMIN)).json()
    assert "/v1/fine_tuning/jobs" in schema["paths"]
    for route in client.app.routes:
        path = getattr(route, "path", "")
        if path == "/health":
            continue
        for method in getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}:
            url = path.replace("{job_id}", "ftjob-x").replace("{namespace}", "a")
            url = url.replace("{ref}", "x")
            r = client.request(method, url)
            assert r.status_code == 401, (method, url, r.status_code)
            r = client.request(method, url, headers=_h("wrong"))
            assert r.status_code == 401, (method, url)


def test_submit_show_list_cancel_events(api):
    client, registry, tokens = api
    r = client.post("/v1/fine_tuning/jobs", json=_body(), headers=_h(tokens["a"]))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=_h(tokens["a"])).json()["id"]
        == job["id"]
    )
    listed = client.get("/v1/fine_tuning/jobs", headers=_h(tokens["a"])).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    jobs.add_event(registry.catalog, job_id=job["id"], kind="metrics", data={"step": 1})
    ev = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=_h(tokens["a"])).json()
    assert [e["type"] for e in ev["data"]] == ["state", "metrics"]
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=_h(tokens["a"]))
    assert r.json()["status"] == "cancelled"
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=_h(tokens["a"]))
    assert r.status_code == 200  # twice is harmless
    with client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers=_h(tokens["a"])
    ) as s:
        text = "".join(s.iter_text())
    assert "event: metrics" in text and "event: end" in text and "cancelled" in text
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=_h(tokens["a"])).json()[
            "data"
        ]
        == []
    )


def test_namespaces_are_invisible_to_each_other(api):
    client, _, tokens = api
    job = client.post("/v1/fine_tuning/jobs", json=_body("a"), headers=_h(tokens["a"])).json()
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=_h(tokens["b"])).status_code == 404
    )
    assert (
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=_h(tokens["b"])).status_code
        == 404
    )
    assert client.get("/v1/fine_tuning/jobs", headers=_h(tokens["b"])).json()["data"] == []
    r = client.post("/v1/fine_tuning/jobs", json=_body("a"), headers=_h(tokens["b"]))
    assert r.status_code == 403 and r.json()["error"]["field"] == "namespace"
    assert len(client.get("/v1/fine_tuning/jobs", headers=_h(ADMIN)).json()["data"]) == 1


def test_idempotency(api):
    client, _, tokens = api
    hdr = {**_h(tokens["a"]), "Idempotency-Key": "key-1"}
    first = client.post("/v1/fine_tuning/jobs", json=_body(), headers=hdr)
    again = client.post("/v1/fine_tuning/jobs", json=_body(), headers=hdr)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/fine_tuning/jobs", json=_body(priority=3), headers=hdr)
    assert other.status_code == 409 and other.json()["error"]["field"] == "idempotency_key"

    ids, lock = [], threading.Lock()

    def post() -> None:
        r = client.post(
            "/v1/fine_tuning/jobs",
            json=_body(name="burst"),
            headers={**_h(tokens["a"]), "Idempotency-Key": "burst"},
        )
        with lock:
            ids.append((r.status_code, r.json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for _, i in ids}) == 1
    assert sorted(c for c, _ in ids).count(201) == 1


def test_adapter_routes(api, tiny_base_dir, tmp_path):
    client, registry, tokens = api
    model, _ = load_base(tiny_base_dir)
    inject_lora(model, LoraConfig(r=4))
    save_adapter(model, LoraConfig(r=4), tmp_path / "ad")
    registry.import_adapter(adapter_dir=tmp_path / "ad", ref="a/digits", base_model="tiny")
    registry.import_adapter(adapter_dir=tmp_path / "ad", ref="a/digits", base_model="tiny")
    h = _h(tokens["a"])
    listed = client.get("/v1/adapters", headers=h).json()["data"]
    assert [v["id"] for v in listed] == ["a/digits:2", "a/digits:1"]
    shown = client.get("/v1/adapters/a/digits:1", headers=h).json()
    assert shown["base_model"]["name"] == "tiny" and len(shown["files"]) == 2
    r = client.post("/v1/adapters/a/digits:1/promote", json={"alias": "production"}, headers=h)
    assert r.json()["aliases"] == ["production"]
    assert client.get("/v1/adapters/a/digits@production", headers=h).json()["version"] == 1
    assert client.get("/v1/adapters/a/digits", headers=_h(tokens["b"])).status_code == 404
    assert client.get("/v1/adapters", headers=_h(tokens["b"])).json()["data"] == []
    assert client.get("/v1/adapters/a/%2E%2E", headers=h).status_code == 400  # ".." refused
    assert client.delete("/v1/adapters/a/digits:2", headers=h).json()["state"] == "deleted"
    assert client.get("/v1/adapters/a/digits", headers=h).json()["version"] == 1


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
)
_fields = st.sampled_from(
    [
        "name",
        "namespace",
        "base_model",
        "training_data",
        "output_adapter",
        "priority",
        "max_failures",
        "lora",
        "training",
        "resources",
        "bogus",
        "idempotency_key",
        "tags",
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    patch=st.dictionaries(_fields, _values, max_size=4),
    nested=st.dictionaries(
        st.sampled_from(["r", "lr", "max_steps", "nodes", "x"]), _values, max_size=2
    ),
)
def test_fuzzed_job_bodies_never_5xx_and_name_the_field(api, patch, nested):
    client, _, _ = api
    body = {**_body(), **patch}
    if "training" in patch and isinstance(patch["training"], dict | type(None)):
        body["training"] = nested
    r = client.post("/v1/fine_tuning/jobs", json=body, headers=_h(ADMIN))
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["field"], r.text
        assert err["message"].startswith(err["field"]) or err["field"] in err["message"]
