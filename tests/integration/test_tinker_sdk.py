"""The unmodified ``tinker`` SDK (PyPI 0.38.0) against ``lorafleet server``'s Tinker API, on
SmolLM2 (a real tokenizer and model): training, sampling, state round trips, custom losses,
bad input and namespaces."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infra.servers import AppServer
from orchestrator.api import create_app
from storage.catalog import jobs
from storage.catalog import repository as repo
from storage.registry import Registry
from storage.settings import load_settings

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

ADMIN = "admin-secret-token-of-the-tinker-tests"
TINKER_NAME = "meta-llama/Llama-3.2-1B"  # a cookbook registry name, mapped to SmolLM2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Iterator[Any]:
    os.environ["TINKER_TELEMETRY"] = "0"
    home = tmp_path_factory.mktemp("tinker-home")
    s = load_settings({"LORAFLEET_HOME": str(home), "LORAFLEET_API_TOKEN": ADMIN,
                       "LORAFLEET_TINKER_MODELS": f"{TINKER_NAME}=smollm2"})  # fmt: skip
    registry = Registry.from_settings(s)
    registry.catalog.upgrade()
    registry.register_base(name="smollm2", path=smollm_dir)
    keys = {ns: "tml-" + repo.create_token(registry.catalog, namespace=ns, name="t")
            for ns in ("a", "b")}  # fmt: skip
    from workers.base_model import load_tokenizer

    app = AppServer(create_app(s, registry))
    yield app, keys, registry, load_tokenizer(smollm_dir)
    app.stop()


def _datum(tokens: list[int], weights: list[float] | None = None) -> Any:
    n = len(tokens) - 1
    w = np.ones(n, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], np.int64),
                                       "weights": w})  # fmt: skip


def _lp(out: Any, i: int = 0) -> np.ndarray:
    return np.asarray(out.loss_fn_outputs[i]["logprobs"].to_numpy(), dtype=np.float64)


def _chat(tok: Any, prompt: str, answer: str) -> tuple[list[int], list[float]]:
    p = tok.encode(prompt)
    full = p + tok.encode(answer) + [tok.eos_token_id]
    return full, [0.0] * (len(p) - 1) + [1.0] * (len(full) - len(p))


def test_train_sample_save_resume_custom_loss(server: Any) -> None:
    app, keys, registry, tok = server
    tokens, weights = _chat(tok, "Q: what is two plus two?\nA:", " four")
    datum = _datum(tokens, weights)
    with tinker.ServiceClient(base_url=app.url, api_key=keys["a"]) as sc:
        tc = sc.create_lora_training_client(base_model=TINKER_NAME, rank=8, seed=3).result()
        assert tc.get_info().model_data.model_name == TINKER_NAME
        # forward changes nothing and equals forward_backward's loss
        f0 = tc.forward([datum], "cross_entropy").result()
        fb = tc.forward_backward([datum], "cross_entropy").result()
        lp = _lp(fb)
        assert len(lp) == len(tokens) - 1
        assert fb.metrics["loss:sum"] == pytest.approx(-(lp * weights).sum(), rel=1e-5)
        assert f0.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-6)
        np.testing.assert_allclose(_lp(f0), lp, atol=1e-5)
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        after = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert after < fb.metrics["loss:sum"]
        again = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert again == pytest.approx(after, rel=1e-6)

        # sampling the saved weights: 4 sequences, one logprob per token
        sampler = tc.save_weights_and_get_sampling_client(name="step1")
        prompt = tok.encode("Q: what is two plus two?\nA:")
        res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                             sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0,
                                                                  seed=7)).result()  # fmt: skip
        assert len(res.sequences) == 4
        assert len({s.sequence_id for s in res.sequences}) == 4
        for s in res.sequences:
            assert isinstance(s.sequence_id, str)
            assert 1 <= len(s.tokens) <= 8 and len(s.logprobs) == len(s.tokens)
        # the sampler's prompt log-probabilities are the trainer's forward
        seq = prompt + list(res.sequences[0].tokens)
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
        assert scored[0] is None
        trainer_lp = _lp(tc.forward([_datum(seq)], "cross_entropy").result())
        np.testing.assert_allclose(np.asarray(scored[1:], dtype=np.float64), trainer_lp,
                                   atol=2e-3)  # fmt: skip
        # ... and so are the sampled tokens' own log-probabilities
        np.testing.assert_allclose(res.sequences[0].logprobs, trainer_lp[len(prompt) - 1 :],
                                   atol=2e-3)  # fmt: skip

        # state round trip through the object store, optimizer included
        state = tc.save_state("s1").result().path
        assert state.startswith("tinker://") and "/weights/s1" in state
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        np.testing.assert_allclose(_lp(tc2.forward([datum], "cross_entropy").result()),
                                   _lp(tc.forward([datum], "cross_entropy").result()),
                                   atol=1e-6)  # fmt: skip
        for client in (tc, tc2):  # the same next step: Adam's moments came back exactly
            client.forward_backward([datum], "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        np.testing.assert_allclose(_lp(tc2.forward([datum], "cross_entropy").result()),
                                   _lp(tc.forward([datum], "cross_entropy").result()),
                                   atol=1e-5)  # fmt: skip

        # a pairwise DPO loss computed by the SDK on returned log-probabilities
        chosen, cw = _chat(tok, "Say hi:", " hello")
        rejected, rw = _chat(tok, "Say hi:", " go away")
        pair = [_datum(chosen, cw), _datum(rejected, rw)]

        def dpo(data: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
            import torch

            c = (logprobs[0] * torch.tensor(cw)).sum()
            r = (logprobs[1] * torch.tensor(rw)).sum()
            loss = -torch.nn.functional.logsigmoid(0.1 * (c - r))
            return loss, {"margin:mean": float(c - r)}

        before = tc.forward(pair, "cross_entropy").result()
        custom = tc.forward_backward_custom(pair, dpo).result()
        assert "margin:mean" in custom.metrics
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        after_pair = tc.forward(pair, "cross_entropy").result()
        margin = lambda out: (_lp(out, 0) * cw).sum() - (_lp(out, 1) * rw).sum()  # noqa: E731
        assert margin(after_pair) > margin(before)

        # the policy losses at ratio 1 (sampler logprobs = the policy's own)
        own = _lp(tc.forward([datum], "cross_entropy").result())
        adv = np.linspace(-1.0, 1.0, len(own)).astype(np.float32)
        rl = types.Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "logprobs": own.astype(np.float32), "advantages": adv})  # fmt: skip
        for name, expected in (("importance_sampling", -adv.sum()), ("ppo", -adv.sum()),
                               ("cispo", -(own * adv).sum())):  # fmt: skip
            got = tc.forward([rl], name).result().metrics["loss:sum"]
            assert got == pytest.approx(float(expected), abs=1e-3), name
        model_id = tc.model_id
    # `with ServiceClient()` finished the session: its jobs succeeded, losses recorded
    listed = [j for j in jobs.list_jobs(registry.catalog) if j.spec.get("kind") == "tinker"
              and j.spec["tinker"]["model_id"] == model_id]  # fmt: skip
    assert len(listed) == 1
    _wait_state(registry, listed[0].id, "succeeded")
    losses = [e.data["loss"] for e in jobs.list_events(registry.catalog, job_id=listed[0].id)
              if e.kind == "metrics"]  # fmt: skip
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    # the sampler weights are an immutable catalog version in the key's namespace
    versions = [v for v in registry.list() if v.namespace == "a"]
    lineage = [v.hyperparameters["tinker"] for v in versions if "tinker" in v.hyperparameters]
    assert any(t["model_id"] == model_id and t["step"] == 1 for t in lineage), lineage


def _wait_state(registry: Registry, job_id: str, state: str) -> None:
    from infra.servers import wait_until

    wait_until(lambda: jobs.get_job(registry.catalog, job_id=job_id).state == state,
               timeout_s=60, what=f"job {job_id} {state}")  # fmt: skip


def test_bad_input_is_a_user_error_and_namespaces_are_apart(server: Any) -> None:
    app, keys, _, tok = server
    tokens = tok.encode("one two three four")
    good = _datum(tokens)
    with tinker.ServiceClient(base_url=app.url, api_key=keys["a"]) as sc:
        tc = sc.create_lora_training_client(base_model=TINKER_NAME, rank=4).result()
        base_loss = tc.forward([good], "cross_entropy").result().metrics["loss:sum"]
        short = types.Datum(model_input=good.model_input, loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:-1], np.int64),
            "weights": np.ones(len(tokens) - 2, np.float32)})  # fmt: skip
        outside = _datum([*tokens[:-1], 10_000_000])
        for bad, loss_fn, words in ((short, "cross_entropy", "target_tokens"),
                                    (outside, "cross_entropy", "vocabulary"),
                                    (good, "no_such_loss", "unknown loss_fn")):  # fmt: skip
            with pytest.raises(tinker.BadRequestError, match=words):
                tc.forward_backward([bad], loss_fn).result()
        state = tc.save_state("mine").result().path
        # the session goes on, unharmed
        assert tc.forward([good], "cross_entropy").result().metrics["loss:sum"] == \
            pytest.approx(base_loss, rel=1e-6)  # fmt: skip
        with tinker.ServiceClient(base_url=app.url, api_key=keys["b"]) as other:
            with pytest.raises(tinker.NotFoundError):
                other.create_training_client_from_state(state).result()
            # another namespace's model id is not found, as if it did not exist
            r = httpx.post(f"{app.url}/api/v1/optim_step", headers={"X-API-Key": keys["b"]},
                           json={"model_id": tc.model_id, "seq_id": 99,
                                 "adam_params": {"learning_rate": 0.1}})  # fmt: skip
            assert r.status_code == 404 and r.json()["error"]["message"]
        r = httpx.post(f"{app.url}/api/v1/create_session", headers={"X-API-Key": "tml-wrong"},
                       json={"tags": [], "user_metadata": None, "sdk_version": "0"})  # fmt: skip
        assert r.status_code == 401
        assert tc.forward([good], "cross_entropy").result().metrics["loss:sum"] == \
            pytest.approx(base_loss, rel=1e-6)  # fmt: skip
