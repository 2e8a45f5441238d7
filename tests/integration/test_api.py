"""API contract tests with httpx against the real app (SQLite catalog, local object store)."""

from __future__ import annotations

import json
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
    for ns in ("a", "b"):  # one uploaded dataset per namespace
        r = client.post("/v1/files", headers=_h(tokens[ns]), data={"purpose": "fine-tune"},
                        files={"file": (f"{ns}.jsonl", DATA[ns], "application/jsonl")})  # fmt: skip
        assert r.status_code == 201, r.text
        FILES[ns] = r.json()["id"]
    return client, registry, tokens


FILES: dict[str, str] = {}  # namespace -> its uploaded file id (set by the fixture)
DATA = {ns: b'{"prompt": "spell 1 =", "completion": " one"}\n' * (2 if ns == "a" else 3)
        for ns in ("a", "b")}  # fmt: skip


def _h(token):  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {token}"}


def _body(ns="a", name="job", **extra):  # type: ignore[no-untyped-def]
    return {"name": name, "namespace": ns, "base_model": "tiny", "training_data": FILES[ns],
            "output_adapter": f"{ns}/{name}", **extra}  # fmt: skip


def test_every_route_but_health_needs_a_token(api):
    client, _, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    for open_by_default in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(open_by_default).status_code in (401, 404)
    schema = client.get("/v1/openapi.json", headers=_h(ADMIN)).json()
    assert "/v1/fine_tuning/jobs" in schema["paths"]
    # the console's page and scripts are open: they hold no data, which comes from /v1 only
    page = client.get("/")
    assert page.status_code == 200 and "console/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/console/app.js").status_code == 200
    assert client.get("/console/../storage/settings.py").status_code == 404
    for route in client.app.routes:
        path = getattr(route, "path", "")
        if path in ("/health", "/"):
            continue
        for method in getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}:
            url = path.replace("{job_id}", "ftjob-x").replace("{namespace}", "a")
            url = url.replace("{ref}", "x").replace("{file_id}", FILES["a"])
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
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"
    assert client.get(url, headers=_h(tokens["a"])).json()["data"] == []
    for step in (5, 10):  # what training records: the API lists it from the catalog
        uri = f"s3://b/p/checkpoints/{job['id']}/step-{step:08d}"
        jobs.add_event(registry.catalog, job_id=job["id"], kind="checkpoint",
                       data={"step": step, "uri": uri})  # fmt: skip
    listed = client.get(url, headers=_h(tokens["a"])).json()["data"]
    assert [c["step_number"] for c in listed] == [10, 5]
    assert listed[0]["uri"].endswith("step-00000010")
    assert client.get(url, headers=_h(tokens["b"])).status_code == 404


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
    other = client.post("/v1/fine_tuning/jobs", json=_body(max_failures=3), headers=hdr)
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


def test_idempotency_keys_are_checked_like_client_tokens(api):
    client, registry, tokens = api
    url, hdr = "/v1/fine_tuning/jobs", _h(tokens["a"])
    before = len(jobs.list_jobs(registry.catalog))
    empty = client.post(url, json=_body(), headers={**hdr, "Idempotency-Key": ""})
    assert empty.status_code == 400 and empty.json()["error"]["field"] == "idempotency_key"
    differ = client.post(url, json=_body(idempotency_key="one"),
                         headers={**hdr, "Idempotency-Key": "two"})  # fmt: skip
    assert differ.status_code == 400 and "differ" in differ.json()["error"]["message"]
    assert len(jobs.list_jobs(registry.catalog)) == before  # nothing was stored
    # the key is not part of the compared body: header first, then the same key in the body
    first = client.post(url, json=_body(name="k"), headers={**hdr, "Idempotency-Key": "same"})
    again = client.post(url, json=_body(name="k", idempotency_key="same"), headers=hdr)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]


def test_priority_is_capped_by_the_namespace_maximum(api):
    client, registry, tokens = api
    hdr = _h(tokens["a"])
    r = client.post("/v1/fine_tuning/jobs", json=_body(name="loud", priority=100), headers=hdr)
    assert r.status_code == 422 and r.json()["error"]["field"] == "priority"
    assert "maximum of 0" in r.json()["error"]["message"]  # the default: every team equal
    repo.set_namespace_limits(registry.catalog, namespace="a", max_priority=10)
    r = client.post("/v1/fine_tuning/jobs", json=_body(name="loud", priority=10), headers=hdr)
    assert r.status_code == 201 and r.json()["priority"] == 10


def test_hostile_inputs_are_4xx_and_store_nothing(api):
    """Inputs a review found answering 500: each is a 4xx naming the field, and no job row is
    left behind."""
    client, registry, tokens = api
    hdr = _h(tokens["a"])
    before = len(jobs.list_jobs(registry.catalog))
    for token in ("tök", "se\u00a0cret"):  # non-ASCII bearer tokens, as raw header bytes
        auth = f"Bearer {token}".encode()
        r = client.get("/v1/fine_tuning/jobs", headers={"Authorization": auth})  # type: ignore[dict-item]
        assert r.status_code == 401, r.text
    for ref in ("x:²", "x:١", f"x:{2**63}"):
        r = client.get(f"/v1/adapters/a/{ref}", headers=hdr)
        assert 400 <= r.status_code < 500, (ref, r.text)
    for patch in ({"training": {"epochs": float("inf")}}, {"lora": {"alpha": float("inf")}},
                  {"resources": {"cpus_per_worker": float("inf")}},
                  {"training": {"epochs": 1e308}}, {"tags": ["No Spaces"]}):  # fmt: skip
        raw = json.dumps(_body(**patch))  # Infinity, as JavaScript clients may send it
        r = client.post("/v1/fine_tuning/jobs", content=raw,
                        headers={**hdr, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 422, (patch, r.text)
        field = r.json()["error"]["field"]
        assert field and field.split(".")[0] in patch, (patch, field)
    assert len(jobs.list_jobs(registry.catalog)) == before
    job = client.post("/v1/fine_tuning/jobs", json=_body(name="ev"), headers=hdr).json()
    r = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": 2**63},
                   headers=hdr)  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["field"] == "after"


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
    # imported without a stored spectrum: computed from the verified files
    spectrum = client.get("/v1/adapters/a/digits:1/spectrum", headers=h).json()
    assert spectrum["r"] == 4 and all(x["rank_99"] <= 4 for x in spectrum["layers"])
    r = client.post("/v1/adapters/a/digits:1/promote", json={"alias": "production"}, headers=h)
    assert r.json()["aliases"] == ["production"]
    assert client.get("/v1/adapters/a/digits@production", headers=h).json()["version"] == 1
    assert client.get("/v1/adapters/a/digits", headers=_h(tokens["b"])).status_code == 404
    assert client.get("/v1/adapters", headers=_h(tokens["b"])).json()["data"] == []
    assert client.get("/v1/adapters/a/%2E%2E", headers=h).status_code == 400  # ".." refused
    assert client.delete("/v1/adapters/a/digits:2", headers=h).json()["state"] == "deleted"
    assert client.get("/v1/adapters/a/digits", headers=h).json()["version"] == 1


def test_gates_refuse_with_numbers_admins_force_and_events_record_it(api, tiny_base_dir, tmp_path):
    client, registry, tokens = api
    model, _ = load_base(tiny_base_dir)
    inject_lora(model, LoraConfig(r=4))
    save_adapter(model, LoraConfig(r=4), tmp_path / "ad")
    for _ in range(2):
        registry.import_adapter(adapter_dir=tmp_path / "ad", ref="a/gated", base_model="tiny")
    from storage.catalog.models import AdapterVersionRow

    with registry.catalog.session() as s:  # as two jobs' publishes would record them
        for row in s.query(AdapterVersionRow):
            row.metrics = {"eval_loss": 0.8 if row.version == 1 else 0.4}
    writer = _h(tokens["a"])
    admin_a = _h(repo.create_token(registry.catalog, namespace="a", name="adm", scope="admin"))
    gate = {"require": ["eval_loss<=0.5"]}
    r = client.put("/v1/adapters/a/gated/gates/production", json=gate, headers=writer)
    assert r.status_code == 403  # a write token may promote, not set gates
    r = client.put("/v1/adapters/a/gated/gates/production", json={"require": ["loss<<"]},
                   headers=admin_a)  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["field"] == "require"
    r = client.put("/v1/adapters/a/gated/gates/production", json=gate, headers=admin_a)
    assert r.json()["gates"] == {"production": ["eval_loss<=0.5"]}
    assert client.get("/v1/adapters/a/gated/gates", headers=_h(tokens["b"])).status_code == 404
    verdict = client.get("/v1/adapters/a/gated:1/gate", params={"alias": "production"},
                         headers=writer).json()  # fmt: skip
    assert verdict["passed"] is False and verdict["results"][0]["value"] == 0.8
    r = client.post("/v1/adapters/a/gated:1/promote", json={"alias": "production"}, headers=writer)
    assert r.status_code == 409
    assert "a/gated:1 has eval_loss 0.8 > 0.5" in r.json()["error"]["message"]
    assert (
        "production" not in client.get("/v1/adapters/a/gated:1", headers=writer).json()["aliases"]
    )
    r = client.post("/v1/adapters/a/gated:1/promote", json={"alias": "production", "force": True},
                    headers=writer)  # fmt: skip
    assert r.status_code == 403  # only an admin forces
    r = client.post("/v1/adapters/a/gated:1/promote", json={"alias": "production", "force": True},
                    headers=admin_a)  # fmt: skip
    assert r.status_code == 200 and r.json()["aliases"] == ["production"]
    r = client.post("/v1/adapters/a/gated:2/promote", json={"alias": "production"}, headers=writer)
    assert r.status_code == 200
    r = client.post("/v1/adapters/a/gated/aliases/production/rollback", json={}, headers=writer)
    assert r.status_code == 409 and "0.8 > 0.5" in r.json()["error"]["message"]  # gated too
    events = client.get("/v1/adapters/a/gated/events", headers=writer).json()["data"]
    assert [(e["type"], e["version"]) for e in events] == [
        ("promoted", 2), ("promoted_forced", 1), ("gate_set", None)]  # fmt: skip
    assert events[1]["actor"] == "a admin token"
    assert events[1]["data"]["gate"]["results"][0]["passed"] is False
    r = client.delete("/v1/adapters/a/gated/gates/production", headers=admin_a)
    assert r.json()["gates"] == {}


def test_usage_serving_idle_and_me_are_scoped_by_namespace(api):
    from datetime import timedelta

    from storage.catalog import usage
    from storage.catalog.models import utcnow

    client, registry, tokens = api
    now = usage.minute_of(utcnow())
    usage.add_usage(registry.catalog, [
        usage.UsageCount(now, "a", "a/x:1", 3, 30, 9), usage.UsageCount(now, "b", "b/y:2", 1, 5, 5),
        usage.UsageCount(now - timedelta(days=2), "a", "a/x:1", 1, 1, 1)])  # fmt: skip
    cached = {"enabled": True, "hits": 5, "misses": 2, "hit_tokens": 640, "miss_tokens": 90,
              "tokens": 512, "block_tokens": 16}  # fmt: skip
    stats = {"slots": {"n": 4, "resident": ["a/x:1", "b/y:2"]}, "host": {"resident": ["b/y:2"]},
             "load_ms": {"count": 1}, "prefix_cache": cached}  # fmt: skip
    usage.record_replica(registry.catalog, replica_id="r1", base="tiny", node="n", stats=stats)
    mine = client.get("/v1/usage", params={"since": "1d"}, headers=_h(tokens["a"])).json()["data"]
    assert [(u["model"], u["requests"], u["total_tokens"]) for u in mine] == [("a/x:1", 3, 39)]
    assert len(client.get("/v1/usage", headers=_h(ADMIN)).json()["data"]) == 2
    assert client.get("/v1/usage", params={"namespace": "b"},
                      headers=_h(tokens["a"])).json()["data"] == []  # fmt: skip
    r = client.get("/v1/usage", params={"since": "yesterday"}, headers=_h(ADMIN))
    assert r.status_code == 422 and r.json()["error"]["field"] == "since"
    per_min = client.get("/v1/usage", params={"group": "minute", "adapter": "a/x"},
                         headers=_h(ADMIN)).json()["data"]  # fmt: skip
    assert [u["requests"] for u in per_min] == [1, 3]
    replicas = client.get("/v1/serving", headers=_h(tokens["a"])).json()["replicas"]
    assert replicas[0]["tiers"]["device"] == ["a/x:1"] and replicas[0]["tiers"]["host"] == []
    cache = replicas[0]["prefix_cache"]  # hits and misses of the replica's prefix cache
    assert (cache["hits"], cache["misses"], cache["hit_tokens"]) == (5, 2, 640)
    assert client.get("/v1/serving", headers=_h(ADMIN)).json()["replicas"][0]["tiers"]["host"] == [
        "b/y:2"]  # fmt: skip
    assert client.get("/v1/adapters/idle", params={"days": 30},
                      headers=_h(tokens["a"])).json()["data"] == []  # fmt: skip
    assert client.get("/v1/me", headers=_h(tokens["a"])).json() == {
        "object": "principal", "namespace": "a", "scope": "write"}  # fmt: skip
    assert client.get("/v1/me", headers=_h(ADMIN)).json()["namespace"] is None


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


def test_files_upload_list_show_content_delete(api):
    client, registry, tokens = api
    h = _h(tokens["a"])
    shown = client.get(f"/v1/files/{FILES['a']}", headers=h).json()
    assert shown["object"] == "file" and shown["rows"] == 2 and shown["namespace"] == "a"
    assert shown["bytes"] == len(DATA["a"]) and shown["filename"] == "a.jsonl"
    again = client.post("/v1/files", headers=h, data={"purpose": "fine-tune"},
                        files={"file": ("renamed.jsonl", DATA["a"])})  # fmt: skip
    assert again.json()["id"] == FILES["a"]  # identical content: one file
    assert [f["id"] for f in client.get("/v1/files", headers=h).json()["data"]] == [FILES["a"]]
    assert client.get(f"/v1/files/{FILES['a']}/content", headers=h).content == DATA["a"]
    # another namespace's file does not exist for this token
    for url in (f"/v1/files/{FILES['b']}", f"/v1/files/{FILES['b']}/content"):
        assert client.get(url, headers=h).status_code == 404
    assert client.delete(f"/v1/files/{FILES['b']}", headers=h).status_code == 404
    assert client.get("/v1/files/../../etc/hostname", headers=h).status_code == 404
    assert len(client.get("/v1/files", headers=_h(ADMIN)).json()["data"]) == 2
    # a queued job trains on it: the delete is refused, naming the job
    job = client.post("/v1/fine_tuning/jobs", json=_body(name="uses-a"), headers=h).json()["id"]
    busy = client.delete(f"/v1/files/{FILES['a']}", headers=h)
    assert busy.status_code == 409 and job in busy.json()["error"]["message"]
    assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=h).status_code == 200
    r = client.delete(f"/v1/files/{FILES['a']}", headers=h)
    assert r.json() == {"id": FILES["a"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{FILES['a']}", headers=h).status_code == 404
    # the bytes stay until gc (an upload of the same content may count on them) …
    assert registry.store.list(f"blobs/sha256/{shown['sha256']}")
    again = client.post("/v1/files", headers=h, data={"purpose": "fine-tune"},
                        files={"file": ("again.jsonl", DATA["a"])})  # fmt: skip
    assert client.get(f"/v1/files/{again.json()['id']}/content", headers=h).content == DATA["a"]
    client.delete(f"/v1/files/{again.json()['id']}", headers=h)
    registry.gc(min_age_s=0)  # … and gc takes them once nothing names them
    assert not registry.store.list(f"blobs/sha256/{shown['sha256']}")


def test_bad_uploads_are_4xx_naming_the_line(api, tmp_path):
    client, _, tokens = api
    h = _h(tokens["a"])
    bad = b'{"prompt": "x", "completion": "y"}\n{"prompt": "x"\n'
    r = client.post("/v1/files", headers=h, data={"purpose": "fine-tune"},
                    files={"file": ("../../bad.jsonl", bad)})  # fmt: skip
    assert r.status_code == 422 and "bad.jsonl:2" in r.json()["error"]["message"], r.text
    assert "tmp" not in r.json()["error"]["message"]  # the upload's name, no server path
    r = client.post("/v1/files", headers=h, data={"purpose": "batch"},
                    files={"file": ("x.jsonl", DATA["a"])})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose"
    r = client.post("/v1/files", headers=_h(ADMIN), data={"purpose": "fine-tune"},
                    files={"file": ("x.jsonl", DATA["a"])})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["field"] == "namespace"
    r = client.post("/v1/files", headers=h, data={"purpose": "fine-tune", "namespace": "b"},
                    files={"file": ("x.jsonl", DATA["a"])})  # fmt: skip
    assert r.status_code == 403
    # over the size limit: 413, nothing stored
    small = load_settings({"LORAFLEET_HOME": str(tmp_path / "home2"),
                           "LORAFLEET_MAX_UPLOAD_BYTES": "100"})  # fmt: skip
    limited = TestClient(create_app(small, Registry.from_settings(small)))
    tok = repo.create_token(Registry.from_settings(small).catalog, namespace="a", name="t")
    r = limited.post("/v1/files", headers=_h(tok), data={"purpose": "fine-tune"},
                     files={"file": ("big.jsonl", DATA["a"] * 10)})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["field"] == "file", r.text
    assert limited.get("/v1/files", headers=_h(tok)).json()["data"] == []


def test_job_specs_name_data_never_server_paths(api, tmp_path):
    """Paths, file:// and other namespaces' files are refused; nothing of them is quoted."""
    client, _, tokens = api
    secret = tmp_path / "creds.json"
    secret.write_text('{"aws_secret": "TOPSECRET-123"}\n')
    h = _h(tokens["a"])
    cases = [
        ({"training_data": str(secret)}, "training_data"),
        ({"training_data": secret.as_uri()}, "training_data"),
        ({"training_data": "../../etc/hostname"}, "training_data"),
        ({"validation_data": str(secret)}, "validation_data"),
        ({"training_data": FILES["b"]}, "training_data"),  # another namespace's file
        ({"validation_data": "file-" + "f" * 24}, "validation_data"),  # no such file
        ({"base_model": str(tmp_path)}, "base_model"),
        ({"base_model": "no-such-base"}, "base_model"),
    ]
    for patch, field in cases:
        r = client.post("/v1/fine_tuning/jobs", json=_body(**patch), headers=h)
        assert r.status_code == 422, (patch, r.text)
        assert r.json()["error"]["field"] == field, (patch, r.text)
        assert "TOPSECRET" not in r.text and "aws_secret" not in r.text
    assert client.get("/v1/fine_tuning/jobs", headers=h).json()["data"] == []


def test_uploads_are_refused_before_their_body_is_read(api, tmp_path):
    client, _, tokens = api
    h = _h(tokens["a"])

    def chunks():  # no Content-Length: the size is unknown until it is all on disk
        yield b"--x\r\nContent-Disposition: form-data; name=purpose\r\n\r\nfine-tune\r\n--x--\r\n"

    r = client.post("/v1/files", headers={**h, "Content-Type": "multipart/form-data; boundary=x"},
                    content=chunks())  # fmt: skip
    assert r.status_code == 411, r.text
    small = load_settings({"LORAFLEET_HOME": str(tmp_path / "h3"),
                           "LORAFLEET_MAX_UPLOAD_BYTES": "100"})  # fmt: skip
    limited = TestClient(create_app(small, Registry.from_settings(small)))
    body = b"x" * (200 * 1024)  # declared over the limit + form overhead: refused at once
    r = limited.post("/v1/files", headers={**h, "Content-Type": "multipart/form-data; boundary=x"},
                     content=body)  # fmt: skip
    assert r.status_code == 413 and "LORAFLEET_MAX_UPLOAD_BYTES" in r.text


def test_store_faults_are_5xx_without_server_details(api):
    client, registry, tokens = api
    h = _h(tokens["a"])
    shown = client.get(f"/v1/files/{FILES['a']}", headers=h).json()
    registry.store.delete(f"blobs/sha256/{shown['sha256']}")  # the bytes vanished server-side
    r = client.get(f"/v1/files/{FILES['a']}/content", headers=h)
    assert r.status_code == 502, r.text
    assert "blobs/" not in r.text and "file://" not in r.text and "/tmp" not in r.text


def test_tokens_scopes_expiry_and_revocation_route_by_route(api):
    """A read token lists, shows and downloads; every route that changes something is a 403
    for it. Revoked and expired tokens are 401. Token routes need an admin."""
    client, registry, tokens = api
    admin = _h(ADMIN)
    r = client.post("/v1/tokens", json={"namespace": "a", "name": "ro", "scope": "read"},
                    headers=admin)  # fmt: skip
    assert r.status_code == 201 and r.json()["token"].startswith("lf_"), r.text
    ro, ro_id = _h(r.json()["token"]), r.json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json=_body(name="rw"), headers=_h(tokens["a"]))
    job_id = job.json()["id"]
    reads = ["/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}",
             f"/v1/fine_tuning/jobs/{job_id}/events", "/v1/files", f"/v1/files/{FILES['a']}",
             f"/v1/files/{FILES['a']}/content", "/v1/adapters"]  # fmt: skip
    for path in reads:
        assert client.get(path, headers=ro).status_code == 200, path
    writes = [
        ("post", "/v1/fine_tuning/jobs", {"json": _body(name="nope")}),
        ("post", f"/v1/fine_tuning/jobs/{job_id}/cancel", {}),
        ("post", "/v1/files", {"data": {"purpose": "fine-tune"},
                               "files": {"file": ("x.jsonl", DATA["a"], "application/jsonl")}}),
        ("delete", f"/v1/files/{FILES['a']}", {}),
        ("post", "/v1/adapters/a/x/promote", {"json": {"alias": "prod"}}),
        ("delete", "/v1/adapters/a/x:1", {}),
        ("post", "/v1/tokens", {"json": {"namespace": "a", "name": "more"}}),
    ]  # fmt: skip
    for method, path, kw in writes:
        r = getattr(client, method)(path, headers=ro, **kw)
        assert r.status_code == 403 and "read-only" in r.text, (method, path, r.text)
    assert len(jobs.list_jobs(registry.catalog)) == 1  # the read token created nothing
    # a namespace token may not manage tokens; the admin lists them, never their secrets
    assert client.get("/v1/tokens", headers=_h(tokens["a"])).status_code == 403
    listed = client.get("/v1/tokens", params={"namespace": "a"}, headers=admin).json()["data"]
    assert {t["scope"] for t in listed} == {"write", "read"} and "token" not in listed[0]
    assert client.delete(f"/v1/tokens/{ro_id}", headers=admin).status_code == 200
    assert client.get("/v1/fine_tuning/jobs", headers=ro).status_code == 401  # revoked
    short = repo.create_token(registry.catalog, namespace="a", name="short", expires_in_s=60)
    assert client.get("/v1/files", headers=_h(short)).status_code == 200
    _expire(registry, short)
    assert client.get("/v1/files", headers=_h(short)).status_code == 401  # expired


def _expire(registry, token: str) -> None:  # type: ignore[no-untyped-def]
    """Move a token's expiry into the past (as if its lifetime had run out)."""
    from datetime import timedelta

    from sqlalchemy import update

    from storage.catalog.models import ApiTokenRow, utcnow

    with registry.catalog.session() as s:
        s.execute(update(ApiTokenRow).where(ApiTokenRow.token_sha256 == repo.token_digest(token))
                  .values(expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip


def test_a_token_made_by_a_namespace_admin_never_outlives_or_outranks_it(api):
    """The review's findings: a child of an expiring namespace admin expired with it? It did
    not, and could be admin. Now its expiry is the parent's at most, its scope no wider;
    lifetimes under a minute are a 422 that stores nothing; a namespace is a name."""
    client, registry, _ = api
    parent = repo.create_token(registry.catalog, namespace="a", name="boss", scope="admin",
                               expires_in_s=3600)  # fmt: skip
    made = client.post("/v1/tokens", json={"namespace": "a", "name": "kid"}, headers=_h(parent))
    assert made.status_code == 201, made.text
    assert made.json()["expires_at"] is not None  # inherited: it ends with its parent
    assert client.post("/v1/tokens", json={"namespace": "a", "name": "late",
                                           "expires_in_s": 7200},
                       headers=_h(parent)).status_code == 422  # fmt: skip
    writer = repo.create_token(registry.catalog, namespace="a", name="w", scope="write")
    wider = client.post("/v1/tokens", json={"namespace": "a", "name": "up", "scope": "admin"},
                        headers=_h(writer))  # fmt: skip
    assert wider.status_code == 403  # a write token manages no tokens at all
    before = len(repo.list_tokens(registry.catalog, namespace="a"))
    for body, field in (({"expires_in_s": 1e-9}, "expires_in_s"), ({"expires_in_s": 59},
                        "expires_in_s"), ({"namespace": "../x"}, "namespace")):  # fmt: skip
        r = client.post("/v1/tokens", json={"namespace": "a", "name": "bad", **body},
                        headers=_h(ADMIN))  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert len(repo.list_tokens(registry.catalog, namespace="a")) == before  # no row
    ends = {t.name: t.expires_at for t in repo.list_tokens(registry.catalog, namespace="a")}
    assert ends["kid"] is not None and ends["boss"] is not None
    assert ends["kid"] <= ends["boss"]  # the child ends no later than its parent
    assert [t.scope for t in repo.list_tokens(registry.catalog, namespace="a")
            if t.name == "kid"] == ["write"]  # fmt: skip


def test_job_lists_come_in_pages(api):
    """OpenAI's paging: limit ≤ 100, an ``after`` cursor, ``has_more``; pages walk every job
    once, newest first; a cursor from another namespace is refused."""
    client, _, tokens = api
    hdr = _h(tokens["a"])
    made = [client.post("/v1/fine_tuning/jobs", json=_body(name=f"p{i}"), headers=hdr).json()["id"]
            for i in range(7)]  # fmt: skip
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"after": after} if after else {})}
        page = client.get("/v1/fine_tuning/jobs", params=params, headers=hdr).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == 3 and seen == list(reversed(made))  # newest first, each once
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 101},
                      headers=hdr).status_code == 422  # fmt: skip
    other = client.post("/v1/fine_tuning/jobs", json=_body("b", name="theirs"),
                        headers=_h(tokens["b"])).json()["id"]  # fmt: skip
    r = client.get("/v1/fine_tuning/jobs", params={"after": other}, headers=hdr)
    assert r.status_code == 400 and r.json()["error"]["field"] == "after"


def _walk(client, path, hdr, limit, **params):  # type: ignore[no-untyped-def]
    """Every id a paged list yields, and how many pages it took."""
    seen, after, pages = [], None, 0
    while True:
        q = {"limit": limit, **params, **({"after": after} if after else {})}
        r = client.get(path, params=q, headers=hdr)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [x["id"] for x in page["data"]]
        pages += 1
        if not page["has_more"]:
            return seen, pages
        after = page["last_id"] if "last_id" in page else page["data"][-1]["id"]


def test_adapter_file_and_event_lists_come_in_pages(api, tiny_base_dir, tmp_path):
    client, registry, tokens = api
    hdr = _h(tokens["a"])
    model, _ = load_base(tiny_base_dir)
    inject_lora(model, LoraConfig(r=4))
    save_adapter(model, LoraConfig(r=4), tmp_path / "ad")
    made = []
    for i in range(5):
        made.append(registry.import_adapter(adapter_dir=tmp_path / "ad", ref=f"a/n{i % 2}",
                                            base_model="tiny").ref)  # fmt: skip
    registry.import_adapter(adapter_dir=tmp_path / "ad", ref="b/theirs", base_model="tiny")
    seen, pages = _walk(client, "/v1/adapters", hdr, 2)
    assert seen == made[::-1] and pages == 3  # newest first, each once, only namespace a's
    # a version deleted between pages still marks the place
    first = client.get("/v1/adapters", params={"limit": 2}, headers=hdr).json()
    client.delete(f"/v1/adapters/{first['last_id']}", headers=hdr)
    rest = client.get("/v1/adapters", params={"after": first["last_id"]}, headers=hdr).json()
    assert [v["id"] for v in rest["data"]] == made[::-1][2:]
    for bad in ("a/n0", "a/n0@prod", "b/theirs:1", "a/nope:1", "../x"):
        r = client.get("/v1/adapters", params={"after": bad}, headers=hdr)
        assert r.status_code == 400 and r.json()["error"]["field"] == "after", (bad, r.text)

    uploaded = [FILES["a"]]
    for i in range(4):
        body = b'{"prompt": "spell %d =", "completion": " x"}\n' % i
        r = client.post("/v1/files", headers=hdr, data={"purpose": "fine-tune"},
                        files={"file": (f"f{i}.jsonl", body, "application/jsonl")})  # fmt: skip
        uploaded.append(r.json()["id"])
    seen, pages = _walk(client, "/v1/files", hdr, 2)
    assert sorted(seen) == sorted(uploaded) and len(seen) == 5 and pages == 3
    r = client.get("/v1/files", params={"after": FILES["b"]}, headers=hdr)  # another's cursor
    assert r.status_code == 400 and r.json()["error"]["field"] == "after"

    job = client.post("/v1/fine_tuning/jobs", json=_body(), headers=hdr).json()["id"]
    for step in range(7):
        jobs.add_event(registry.catalog, job_id=job, kind="metrics", data={"step": step})
    every = client.get(f"/v1/fine_tuning/jobs/{job}/events", headers=hdr).json()
    assert not every["has_more"]
    seen, pages = _walk(client, f"/v1/fine_tuning/jobs/{job}/events", hdr, 3)
    assert seen == [e["id"] for e in every["data"]] and pages == -(-len(seen) // 3)


def test_the_schema_documents_every_response_body(api):
    client, _, _ = api
    schema = client.get("/v1/openapi.json", headers=_h(ADMIN)).json()
    operations = [(p, m, op) for p, ops in schema["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 18
    for path, method, op in operations:
        ok = [c for c in op["responses"] if c.startswith("2")]
        assert ok, (method, path)
        for code in ok:
            content = op["responses"][code].get("content", {})
            typed = [c for c in content.values() if c.get("schema", {}).get("$ref")]
            if path == "/v1/openapi.json":
                continue  # the schema itself: an OpenAPI document
            assert typed or set(content) - {"application/json"}, (method, path, code, content)
        if path != "/health":
            for code in ("401", "422"):
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (method, path, code)


def test_event_streams_end_when_their_token_does_and_are_capped(api, monkeypatch):
    """A stream re-checks its token (every STREAM_RECHECK_S, 5 s in service; shortened here)
    and ends with ``unauthorized`` once it is revoked; a token holds at most 8 streams; a
    failure's detail event is shown to admin tokens only."""
    import orchestrator.api.jobs as jobs_api
    from orchestrator.job_errors import DETAIL_EVENT

    monkeypatch.setattr(jobs_api, "STREAM_RECHECK_S", 0.2)
    client, registry, _ = api
    token = repo.create_token(registry.catalog, namespace="a", name="streamer")
    job = client.post("/v1/fine_tuning/jobs", json=_body(name="s"), headers=_h(token)).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true"
    with client.stream("GET", url, headers=_h(token)) as stream:
        assert stream.status_code == 200
        owner = repo.token_owner(registry.catalog, token=token)
        assert owner is not None
        repo.revoke_token(registry.catalog, token_id=owner.id)
        lines = [ln for ln in stream.iter_lines() if ln.startswith("data:")]
    assert json.loads(lines[-1][5:]) == {"status": "unauthorized"}  # the stream ended itself
    jobs.add_event(registry.catalog, job_id=job["id"], kind=DETAIL_EVENT,
                   data={"detail": "s3://bucket/x"})  # fmt: skip
    writer = repo.create_token(registry.catalog, namespace="a", name="w2")
    seen = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=_h(writer)).json()
    assert DETAIL_EVENT not in {e["type"] for e in seen["data"]}
    admin_seen = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                            headers=_h(ADMIN)).json()["data"]  # fmt: skip
    assert any("s3://bucket/x" in json.dumps(e) for e in admin_seen)
    streams = jobs_api.StreamCount(limit=2)  # the cap, on its own
    assert streams.open("t") and streams.open("t") and not streams.open("t")
    streams.close("t")
    assert streams.open("t") and not streams.open("t")


def test_an_over_long_line_is_refused_while_it_streams_in(tmp_path, tiny_base_dir):
    """A per-line cap (LORAFLEET_MAX_LINE_BYTES, 8 MiB by default; 1 KiB here): a longer row
    is a 413 naming where it is, checked as the bytes arrive (memory stays bounded by the
    cap); rows under it upload as usual. Uploads at once per namespace are capped too."""
    from orchestrator.api.files import UploadSlots

    s = load_settings({"LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_API_TOKEN": ADMIN,
                       "LORAFLEET_MAX_LINE_BYTES": "1024"})  # fmt: skip
    registry = Registry.from_settings(s)
    client = TestClient(create_app(s, registry))
    token = repo.create_token(registry.catalog, namespace="a", name="t")
    row = b'{"prompt": "spell 1 =", "completion": " one"}\n'
    long = b'{"prompt": "' + b"x" * 3000 + b'", "completion": " y"}\n'
    for body, where in ((row * 5 + long + row, ":6"), (long, ":1"), (row + long[:-1], ":2")):
        r = client.post("/v1/files", headers=_h(token), data={"purpose": "fine-tune"},
                        files={"file": ("big.jsonl", body)})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["field"] == "file", r.text
        assert f"big.jsonl{where}:" in r.text and "1,024 bytes" in r.text
    ok = client.post("/v1/files", headers=_h(token), data={"purpose": "fine-tune"},
                     files={"file": ("fine.jsonl", row * 50)})  # fmt: skip
    assert ok.status_code == 201 and ok.json()["rows"] == 50
    slots = UploadSlots(2)
    assert slots.take("a") and slots.take("a") and not slots.take("a") and slots.take("b")
    slots.give("a")
    assert slots.take("a")
