"""Tinker sessions as lorafleet jobs, over HTTP on the tiny base: listed by the jobs API with
their losses, ended by a heartbeat timeout with their state saved first, stopped by a cancel,
refused beyond the namespace's job limit, and several sessions sharing one base forward."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infra.servers import AppServer, wait_until
from orchestrator.api import create_app
from orchestrator.tinker import service as tinker_service
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.catalog.namespaces import set_namespace_limits
from storage.registry import Registry
from storage.settings import load_settings

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

ADMIN = "admin-secret-token-of-the-session-tests"


@pytest.fixture()
def server(tmp_path: Path, tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    os.environ["TINKER_TELEMETRY"] = "0"
    monkeypatch.setattr(tinker_service, "REAP_EVERY_S", 0.05)
    monkeypatch.setattr(tinker_service, "JOB_CHECK_S", 0.0)
    s = load_settings({"LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_API_TOKEN": ADMIN})
    registry = Registry.from_settings(s)
    registry.catalog.upgrade()
    registry.register_base(name="tiny", path=tiny_base_dir)
    tokens = {ns: repo.create_token(registry.catalog, namespace=ns, name="t") for ns in "ab"}
    app = AppServer(create_app(s, registry))
    yield app, tokens, registry
    app.stop()


def _post(app: Any, token: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{app.url}/api/v1/{path}", json=body,
                      headers={"X-API-Key": "tml-" + token}, timeout=60)  # fmt: skip


def _result(app: Any, token: str, request_id: str) -> dict[str, Any]:
    while True:
        r = _post(app, token, "retrieve_future", {"request_id": request_id})
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("type") != "try_again":
            return body  # type: ignore[no-any-return]


def _model(app: Any, token: str, session: str, n: int = 0) -> str:
    r = _post(
        app,
        token,
        "create_model",
        {
            "session_id": session,
            "model_seq_id": n,
            "base_model": "tiny",
            "lora_config": {"rank": 4},
        },
    )
    assert r.status_code == 200, r.text
    done = _result(app, token, r.json()["request_id"])
    assert "error" not in done, done
    return str(done["model_id"])


def _session(app: Any, token: str) -> str:
    r = _post(app, token, "create_session", {"tags": [], "user_metadata": None,
                                             "sdk_version": "test"})  # fmt: skip
    return str(r.json()["session_id"])


def test_silent_session_ends_with_its_state_saved(server: Any) -> None:
    app, tokens, registry = server
    app_service(app).heartbeat_s = 1.5  # LORAFLEET_TINKER_HEARTBEAT_S (the SDK beats every 10 s)
    session = _session(app, tokens["a"])
    model = _model(app, tokens["a"], session)
    job = next(j for j in jobs.list_jobs(registry.catalog) if j.spec.get("kind") == "tinker")
    assert job.state == "running" and job.namespace == "a"
    # the jobs API lists it with the other jobs of the namespace
    listed = httpx.get(
        f"{app.url}/v1/fine_tuning/jobs",
        timeout=30,
        headers={"Authorization": f"Bearer {tokens['a']}"},
    ).json()["data"]
    assert [j["method"]["type"] for j in listed if j["id"] == job.id] == ["tinker"]
    other = httpx.get(
        f"{app.url}/v1/fine_tuning/jobs",
        timeout=30,
        headers={"Authorization": f"Bearer {tokens['b']}"},
    ).json()["data"]
    assert job.id not in {j["id"] for j in other}
    # no heartbeat: it ends, cancelled, and its state was saved first
    wait_until(lambda: jobs.get_job(registry.catalog, job_id=job.id).state == "cancelled",
               timeout_s=30, what="the silent session's end")  # fmt: skip
    ended = jobs.get_job(registry.catalog, job_id=job.id)
    assert "heartbeat" in (ended.status_reason or "")
    saved = [e.data["path"] for e in jobs.list_events(registry.catalog, job_id=job.id)
             if e.kind == "checkpoint"]  # fmt: skip
    assert saved == [f"tinker://{model}/weights/final"]
    r = _post(
        app,
        tokens["a"],
        "optim_step",
        {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}},
    )
    assert r.status_code == 400 and "timed out" in r.json()["error"]["message"]
    # the saved state comes back in a new session
    with tinker.ServiceClient(base_url=app.url, api_key="tml-" + tokens["a"]) as sc:
        app_service(app).heartbeat_s = 120.0
        tc = sc.create_training_client_from_state(saved[0]).result()
        assert tc.get_info().lora_rank == 4


def test_cancel_and_quota(server: Any) -> None:
    app, tokens, registry = server
    set_namespace_limits(registry.catalog, namespace="b", max_concurrent_jobs=1)
    with tinker.ServiceClient(base_url=app.url, api_key="tml-" + tokens["b"]) as sc:
        tc = sc.create_lora_training_client(base_model="tiny", rank=4).result()
        # a second client is over the limit: 429, which the SDK retries while the limit lasts
        session = _session(app, tokens["b"])
        r = _post(app, tokens["b"], "create_model", {"session_id": session, "model_seq_id": 0,
                                                     "base_model": "tiny"})  # fmt: skip
        assert r.status_code == 429 and "limit" in r.json()["error"]["message"]
        job = next(j for j in jobs.list_jobs(registry.catalog) if j.namespace == "b")
        r = httpx.post(f"{app.url}/v1/fine_tuning/jobs/{job.id}/cancel", timeout=30,
                       headers={"Authorization": f"Bearer {tokens['b']}"})  # fmt: skip
        assert r.status_code == 200
        datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                            loss_fn_inputs={"target_tokens": np.array([6, 7, 8]),
                                            "weights": np.ones(3, np.float32)})  # fmt: skip
        with pytest.raises(tinker.TinkerError, match="cancelled"):
            for _ in range(100):  # the cancel is read within a reap of the worker
                tc.forward([datum], "cross_entropy").result()
        # the cancelled session no longer counts: the namespace may train again
        wait_until(lambda: sc.create_lora_training_client(base_model="tiny", rank=4).result()
                   is not None, timeout_s=30, what="a new client")  # fmt: skip


def test_sessions_share_one_base_forward(server: Any) -> None:
    app, tokens, _ = server
    service = app_service(app)
    calls: list[int] = []
    release = threading.Event()
    with tinker.ServiceClient(base_url=app.url, api_key="tml-" + tokens["a"]) as sc:
        first, *clients = [
            sc.create_lora_training_client(base_model="tiny", rank=4, seed=k).result()
            for k in range(4)
        ]
        host = service.hosts["tiny"]
        real = host.trainer.accumulate

        def counting(batches: Any, *a: Any, **k: Any) -> Any:
            if not calls:
                release.wait(60)  # the first call holds the worker while the others queue
            calls.append(len(batches))
            return real(batches, *a, **k)

        host.trainer.accumulate = counting
        datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(5, 30))),
                            loss_fn_inputs={"target_tokens": np.arange(6, 31),
                                            "weights": np.ones(25, np.float32)})  # fmt: skip
        held = first.forward_backward([datum], "cross_entropy")
        futures = [c.forward_backward([datum], "cross_entropy") for c in clients]
        ids = {c.model_id for c in clients}
        wait_until(lambda: all(service.models[i].pending for i in ids), timeout_s=30,
                   what="three queued requests")  # fmt: skip
        release.set()
        held.result()
        losses = [f.result().metrics["loss:sum"] for f in futures]
    assert calls[1] == 3  # the three sessions' requests: one forward
    assert all(math.isfinite(x) for x in losses)


def app_service(app: Any) -> Any:
    """The running app's Tinker service."""
    return app._server.config.app.state.tinker


def test_idempotent_submissions_scopes_topk_and_metering(server: Any) -> None:
    app, tokens, registry = server
    session = _session(app, tokens["a"])
    model = _model(app, tokens["a"], session)
    step = {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}
    first = _post(app, tokens["a"], "optim_step", step).json()["request_id"]
    again = _post(app, tokens["a"], "optim_step", step).json()["request_id"]
    assert first == again  # a retried submission is the same request, run once
    assert "metrics" in _result(app, tokens["a"], first)
    # a read-only token lists and reads; it does not train or sample
    reader = repo.create_token(registry.catalog, namespace="a", name="r", scope="read")
    r = _post(app, reader, "create_session", {"tags": [], "user_metadata": None,
                                              "sdk_version": "test"})  # fmt: skip
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    # sampling with top-k log-probabilities of the prompt and of the samples
    saved = _result(app, tokens["a"], _post(app, tokens["a"], "save_weights_for_sampler", {
        "model_id": model, "seq_id": 2, "path": "s1"}).json()["request_id"])  # fmt: skip
    sampler = _post(app, tokens["a"], "create_sampling_session", {
        "session_id": session, "sampling_session_seq_id": 0,
        "model_path": saved["path"]}).json()["sampling_session_id"]  # fmt: skip
    with tinker.ServiceClient(base_url=app.url, api_key="tml-" + tokens["a"]) as sc:
        client = sc.create_sampling_client(model_path=saved["path"])
        res = client.sample(
            types.ModelInput.from_ints([5, 6, 7, 8]),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=4, seed=3, stop=[11]),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=3,
        ).result()
        assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == 4
        assert res.topk_prompt_logprobs is not None and len(res.topk_prompt_logprobs[1]) == 3
        for s in res.sequences:
            assert len(s.logprobs) == len(s.tokens)
            assert 11 not in s.tokens[:-1]  # a stop token ends the sequence (and is kept)
    assert sampler.startswith("smp-")
    # requests and tokens are metered for the namespace, once the worker flushes its counts
    from storage.catalog.usage import query_usage

    def metered() -> list[Any]:
        return [u for u in query_usage(registry.catalog, namespace="a")
                if u.model == "tinker:tiny"]  # fmt: skip

    wait_until(lambda: bool(metered()) and metered()[0].completion_tokens > 0, timeout_s=30,
               what="usage rows")  # fmt: skip
