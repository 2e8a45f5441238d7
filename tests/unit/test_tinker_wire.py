"""Tinker's wire formats against the SDK's own codecs, and the rules of a session's input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.tinker import wire
from orchestrator.tinker.service import UserError, _sampling, parse_model_map
from workers.errors import TrainingError
from workers.training.loss import TokenLogprobs
from workers.training.objectives import TokenDatum, TokenLoss
from workers.training.sessions import check_datums, session_lora

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

MODEL = "0123456789abcdef:train:2"


def _request(data: list[types.Datum], loss_fn: str = "cross_entropy", **cfg: float) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn,
                                                          loss_fn_config=cfg or None),
        model_id=MODEL, seq_id=3)  # fmt: skip
    return bytes(forward_backward_request_to_proto(req).SerializeToString())


def test_forward_backward_request_decodes_what_the_sdk_encodes() -> None:
    d = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4]),
            "logprobs": np.array([-1.0, -2.0, -0.5], np.float32),
            "advantages": np.array([0.0, 1.0, -1.0], np.float32),
        },
    )
    fb = wire.decode_forward_backward(_request([d, d], "ppo", clip_low_threshold=0.7))
    assert (fb.model_id, fb.seq_id, fb.loss_fn, fb.forward_only) == (MODEL, 3, "ppo", False)
    assert fb.config == {"clip_low_threshold": pytest.approx(0.7)}
    assert len(fb.datums) == 2
    assert fb.datums[0].tokens == (1, 2, 3) and fb.datums[0].targets == (2, 3, 4)
    assert fb.datums[0].inputs["advantages"] == (0.0, 1.0, -1.0)


def test_forward_backward_output_and_sample_decode_with_the_sdk() -> None:
    out = deserialize_forward_backward_output(
        wire.encode_forward_backward([[-1.0, -2.5], [-0.25]], {"loss:sum": 3.75})
    )
    assert out.metrics == {"loss:sum": 3.75}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.5], [-0.25]]
    seqs = [wire.SampledSequence([5, 6], [-0.5, -1.5], True, [[(5, -0.5), (7, -2.0)]] * 2),
            wire.SampledSequence([9], [-3.0], False)]  # fmt: skip
    res = deserialize_sample_response(wire.encode_sample(seqs, [None, -1.25, -0.5]))
    assert [s.stop_reason for s in res.sequences] == ["stop", "length"]
    assert list(res.sequences[0].tokens) == [5, 6]
    assert res.sequences[0].logprobs == pytest.approx([-0.5, -1.5])
    assert res.prompt_logprobs is not None and res.prompt_logprobs[0] is None
    assert res.prompt_logprobs[1:] == pytest.approx([-1.25, -0.5])


@pytest.mark.parametrize("body", [b"\xff\xff not protobuf", b""])
def test_garbage_is_a_wire_error(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_forward_backward(body)


@pytest.mark.parametrize("path", ["/etc/passwd", "file:///tmp/x", "tinker://x/weights/a",
                                  f"tinker://{MODEL}/weights/../a", "s3://bucket/key"])  # fmt: skip
def test_only_this_servers_checkpoint_paths_parse(path: str) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_path(path)


def test_paths_and_model_ids_round_trip() -> None:
    p = wire.parse_path(f"tinker://{MODEL}/sampler_weights/step-1")
    assert (p.model_id, p.kind, p.name, str(p)) == (
        MODEL,
        "sampler_weights",
        "step-1",
        f"tinker://{MODEL}/sampler_weights/step-1",
    )
    assert wire.parse_model_id(MODEL) == ("0123456789abcdef", 2)
    with pytest.raises(wire.WireError):
        wire.parse_model_id("../x:train:1")


def _datum(n: int = 3, **inputs: list[float]) -> TokenDatum:
    return TokenDatum(tuple(range(1, n + 1)), tuple(range(2, n + 2)),
                      {k: tuple(v) for k, v in inputs.items()})  # fmt: skip


@pytest.mark.parametrize(("datum", "loss_fn", "words"), [
    (_datum(weights=[1, 1]), "cross_entropy", "weights has 2 entries"),
    (_datum(), "cross_entropy", "needs 'weights'"),
    (_datum(weights=[1, 1, 1]), "dro", "unknown loss_fn"),
    (TokenDatum((1, 2), (2, 999), {"weights": (1.0, 1.0)}), "cross_entropy", "vocabulary"),
    (_datum(logprobs=[0, 0, 0], advantages=[1, math.nan, 1]), "ppo", "not finite"),
    (TokenDatum((), (), {}), "cross_entropy", "empty"),
])  # fmt: skip
def test_bad_datums_are_named(datum: TokenDatum, loss_fn: str, words: str) -> None:
    with pytest.raises(TrainingError, match=words):
        check_datums([datum], loss_fn, vocab=512)


def test_token_losses_are_the_documented_sums() -> None:
    lp = torch.tensor([-1.0, -2.0, -0.5])
    policy = TokenLogprobs(lp, torch.zeros(3, dtype=torch.long), 1)
    ce, _ = TokenLoss("cross_entropy", 0).loss(policy, None, [_datum(weights=[1, 0, 2])])
    assert float(ce) == pytest.approx(2.0)  # -(−1·1 + 0 + −0.5·2)
    adv = [1.0, -2.0, 0.5]
    at_one = _datum(logprobs=lp.tolist(), advantages=adv)  # ratio 1
    for name in ("importance_sampling", "ppo"):
        got, _ = TokenLoss(name, 0).loss(policy, None, [at_one])
        assert float(got) == pytest.approx(-sum(adv))
    cispo, _ = TokenLoss("cispo", 0).loss(policy, None, [at_one])
    assert float(cispo) == pytest.approx(-sum(a * v for a, v in zip(adv, lp.tolist(), strict=True)))
    row = _datum(weights=[1, 1, 1]).example(pad_id=0)
    assert row.input_ids == (1, 2, 3, 0) and row.labels == (-100, 2, 3, 4)


def test_sampling_params_and_settings_are_checked() -> None:
    rows = _sampling({"max_tokens": 5, "stop": ["\n", 7], "top_k": -1, "seed": 3}, 2)
    assert len(rows) == 2 and rows[0]["stop"] == ("\n",) and rows[0]["stop_ids"] == (7,)
    assert rows[0]["top_k"] == 0
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": [1.5]},
                {"seed": "x"}):  # fmt: skip
        with pytest.raises(UserError):
            _sampling(bad, 1)
    assert parse_model_map("meta-llama/Llama-3.2-1B=smollm2, a=b") == {
        "meta-llama/Llama-3.2-1B": "smollm2",
        "a": "b",
    }
    with pytest.raises(ValueError):
        parse_model_map("no-equals")
    with pytest.raises(TrainingError):
        session_lora(4, train_attn=False, train_mlp=False)
