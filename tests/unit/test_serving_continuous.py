"""Iteration-level batching: rows join and leave between steps and decode what they do alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from workers.serving.decode import DecodeRow, RowOutput
from workers.serving.decode_loop import DecodeLoop, Overloaded, Ticket
from workers.serving.kv import RowKVCache, row_mask
from workers.serving.stepper import StepDecoder, decode_batch

PROMPTS = ["spell 1 2 3 4 =", "hello there, spell 9 =", "the quick brown fox", "spell 7 ="]


def _alone(model: Any, tok: Any, row: DecodeRow) -> RowOutput:
    return decode_batch(model, tok, {}, [row])[0]


def _run(decoder: StepDecoder, joins: dict[int, list[DecodeRow]]) -> dict[int, tuple[Any, int]]:
    """Step until idle, adding ``joins[step]`` before that step; returns, per row (in order of
    joining), its output and the step it finished in."""
    done: dict[int, tuple[Any, int]] = {}
    order: list[Any] = []
    step = 0
    while step <= max(joins) or not decoder.idle:
        for row in joins.get(step, []):
            assert decoder.fits(row)
            order.append(decoder.add(row, tag=len(order)))
        for seq in decoder.step().finished:
            done[seq.tag] = (seq.out, step)
        step += 1
    assert len(done) == len(order)
    return done


def test_row_mask_lets_each_query_see_its_own_prefix_only() -> None:
    positions = torch.tensor([[3, 4], [0, 0]])
    real = torch.tensor([[True, True], [False, True]])
    m = row_mask(positions, real, 6, additive=False, dtype=torch.float32)
    assert m.shape == (2, 1, 2, 6)
    assert m[0, 0, 0].tolist() == [True] * 4 + [False] * 2
    assert m[0, 0, 1].tolist() == [True] * 5 + [False]
    assert m[1, 0, 0].tolist() == [True] + [False] * 5  # padding sees position 0 only
    additive = row_mask(positions, real, 6, additive=True, dtype=torch.float32)
    assert additive[0, 0, 0, 5] == torch.finfo(torch.float32).min and additive[0, 0, 0, 0] == 0


def test_row_cache_resize_keeps_what_fits_and_moves_rows() -> None:
    kv = RowKVCache(1)
    kv.resize(2, 4)
    kv.begin([0, 1], [0, 0], [2, 1])
    k = torch.arange(2 * 1 * 2 * 1, dtype=torch.float32).view(2, 1, 2, 1) + 1
    kv.update(k, k, 0)
    assert kv.k[0] is not None
    assert kv.k[0][0, 0, :2, 0].tolist() == [1.0, 2.0]
    assert kv.k[0][1, 0, 0, 0] == 4.0  # right-aligned: row 1's one token is its last query
    kv.resize(3, 8)
    assert kv.k[0].shape == (3, 1, 9, 1) and kv.k[0][0, 0, :2, 0].tolist() == [1.0, 2.0]
    kv.move(0, 2)
    assert kv.k[0][2, 0, :2, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="resize"):
        kv.begin([0], [7], [2])


def test_a_newcomer_joins_the_running_batch_and_decodes_what_it_does_alone(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    long = DecodeRow(tok(PROMPTS[0])["input_ids"], max_new_tokens=24, min_new_tokens=24)
    short = DecodeRow(tok(PROMPTS[1])["input_ids"], max_new_tokens=3, min_new_tokens=3)
    sampled = DecodeRow(tok(PROMPTS[2])["input_ids"], max_new_tokens=6, temperature=0.8, seed=5)
    decoder = StepDecoder(model, tok, {}, max_rows=4, kv_tokens=4096)
    done = _run(decoder, {0: [long], 5: [short], 9: [sampled]})
    for i, row in enumerate((long, short, sampled)):
        assert done[i][0].text == _alone(model, tok, row).text
    # the short request did not wait for the long one: it ended while the long one ran
    assert done[1][1] < done[0][1] and done[2][1] < done[0][1]
    assert done[1][1] <= 5 + 3  # prefill in its first step, then one token per step


def test_long_prompts_prefill_in_chunks_while_running_rows_keep_decoding(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    running = DecodeRow(tok(PROMPTS[3])["input_ids"], max_new_tokens=20, min_new_tokens=20)
    prompt = tok(" ".join(PROMPTS * 3))["input_ids"]
    newcomer = DecodeRow(prompt, max_new_tokens=4)
    decoder = StepDecoder(model, tok, {}, max_rows=4, kv_tokens=4096, prefill_chunk=8)
    first = decoder.add(running)
    decoder.step()
    late = decoder.add(newcomer)
    steps_while_prefilling = 0
    while late.filled < len(prompt):
        before = len(first.out.token_ids)
        report = decoder.step()
        assert len(first.out.token_ids) == before + 1  # the running row got its token
        assert sum(n for kind, n, _ in report.forwards if kind == "prefill") == 1
        steps_while_prefilling += 1
    assert steps_while_prefilling == -(-len(prompt) // 8)  # the prompt went in 8-token chunks
    while not decoder.idle:
        decoder.step()
    assert late.out.text == _alone(model, tok, newcomer).text
    assert first.out.text == _alone(model, tok, running).text


def test_the_kv_budget_bounds_the_buffers_and_admission(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    rows = [DecodeRow(tok(p)["input_ids"], max_new_tokens=n) for p, n in
            zip(PROMPTS * 3, [5, 30, 8, 12] * 3, strict=True)]  # fmt: skip
    budget = 3 * max(len(r.prompt_ids) + r.max_new_tokens for r in rows)
    decoder = StepDecoder(model, tok, {}, max_rows=8, kv_tokens=budget)
    waiting, texts, admitted_together = list(rows), {}, 0
    while waiting or not decoder.idle:
        while waiting and decoder.fits(waiting[0]):
            decoder.add(waiting.pop(0), tag=len(rows) - len(waiting) - 1)
        admitted_together = max(admitted_together, len(decoder.live))
        assert decoder.kv.rows * decoder.kv.length <= budget  # never more than the budget
        for seq in decoder.step().finished:
            texts[seq.tag] = seq.out.text
    assert admitted_together == 3  # the budget, not max_rows, was the limit
    assert decoder.kv.nbytes() == 0  # idle: the buffers are released
    for i, row in enumerate(rows):
        assert texts[i] == _alone(model, tok, row).text
    too_long = DecodeRow(tok(PROMPTS[0])["input_ids"], max_new_tokens=budget)
    assert decoder.too_big(too_long) is not None and "KV cache" in str(decoder.too_big(too_long))


def test_a_row_that_breaks_the_forward_fails_alone(base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A forward that raises is rerun row by row: the poisoned row fails, the rest go on with
    the text they get alone."""
    model, tok = base
    poison = 7  # any token id: the patched model raises when it sees it in its input
    good = [DecodeRow(tok(p)["input_ids"], max_new_tokens=6) for p in PROMPTS[:2]]
    bad = DecodeRow([*tok(PROMPTS[2])["input_ids"], poison], max_new_tokens=6)
    alone = [_alone(model, tok, r).text for r in good]
    forward = model.forward

    def fragile(*args: Any, **kwargs: Any) -> Any:
        if bool((kwargs["input_ids"] == poison).any()):
            raise RuntimeError("a kernel broke on this input")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fragile)
    out = decode_batch(model, tok, {}, [good[0], bad, good[1]])
    assert [out[0].text, out[2].text] == alone
    assert out[1].finish_reason == "error" and "kernel broke" in str(out[1].error)


class _Gate:
    """Holds the decode loop inside a step until released; counts the steps that reached it."""

    def __init__(self, decoder: StepDecoder) -> None:
        self.open, self.reached = threading.Event(), threading.Event()
        step = decoder.step

        def held(*args: Any) -> Any:
            self.reached.set()
            assert self.open.wait(30)
            return step(*args)

        decoder.step = held  # type: ignore[method-assign]


def _ticket(
    row: DecodeRow, results: dict[str, Any], name: str, loop: DecodeLoop | None = None
) -> Ticket:
    done = threading.Event()
    results[name] = done

    def on_done(outs: list[RowOutput], error: tuple[str, str] | None) -> None:
        results[name + ".out"] = (outs[0], error)
        if loop is not None:  # on the loop thread, right after the step it ended in
            results[name + ".step"] = loop.stats.steps
        done.set()

    return Ticket([row], None, on_done)


def test_the_queue_is_bounded_and_answers_overloaded(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    decoder = StepDecoder(model, tok, {}, max_rows=1, kv_tokens=4096)
    gate = _Gate(decoder)
    loop = DecodeLoop(decoder, max_queue=2)
    results: dict[str, Any] = {}
    row = DecodeRow(tok(PROMPTS[0])["input_ids"], max_new_tokens=3)
    loop.submit([_ticket(row, results, "running")])
    assert gate.reached.wait(30)  # the first is admitted and its step is held
    loop.submit([_ticket(row, results, "a")])
    loop.submit([_ticket(row, results, "b")])  # max_rows=1: these two wait in the queue
    with pytest.raises(Overloaded):
        loop.submit([_ticket(row, results, "c")])
    assert loop.stats.rejected == 1 and loop.stats.waiting == 2
    gate.open.set()
    for name in ("running", "a", "b"):
        assert results[name].wait(30)
        out, error = results[name + ".out"]
        assert error is None and out.text == _alone(model, tok, row).text
    with pytest.raises(ValueError, match="KV cache"):  # can never run: refused at once
        loop.submit([_ticket(DecodeRow(row.prompt_ids, max_new_tokens=10**6), results, "huge")])
    loop.close()


def test_a_newcomer_is_admitted_at_the_next_step_not_after_the_batch(base) -> None:  # type: ignore[no-untyped-def]
    """With the loop held on a long request's first step, a short request arrives: it joins at
    the next step and ends long before the long one (counted in steps, not seconds)."""
    model, tok = base
    long = DecodeRow(tok(PROMPTS[0])["input_ids"], max_new_tokens=30, min_new_tokens=30)
    short = DecodeRow(tok(PROMPTS[1])["input_ids"], max_new_tokens=2, min_new_tokens=2)
    decoder = StepDecoder(model, tok, {}, max_rows=4, kv_tokens=4096)
    gate = _Gate(decoder)
    loop = DecodeLoop(decoder)
    results: dict[str, Any] = {}
    loop.submit([_ticket(long, results, "long", loop)])
    assert gate.reached.wait(30)
    loop.submit([_ticket(short, results, "short", loop)])
    gate.open.set()
    for name in ("short", "long"):
        assert results[name].wait(60)
    assert results["short.step"] <= 4  # admitted at once: prefill, then two tokens
    assert results["long.step"] >= 30  # one step per token of its 30
    assert loop.stats.max_rows == 2  # and they shared forward passes
    loop.close()


def test_a_full_queue_is_a_429_with_retry_after_and_kinds_map_to_statuses() -> None:
    """The HTTP layer alone turns engine error kinds into statuses; 429 and 503 say when to
    come back."""
    from fastapi.testclient import TestClient

    from workers.serving.engine import error_kind
    from workers.serving.ingress import HttpError, _app, status_of

    assert status_of(error_kind(Overloaded("full"))) == 429
    assert status_of(error_kind(ValueError("prompt too long"))) == 400
    assert status_of("busy") == 503 and status_of(None) == 500 and status_of("odd") == 500
    app = _app()

    @app.get("/full")
    def full() -> None:
        raise HttpError(status_of("overloaded"), "3 requests are waiting; try again shortly")

    r = TestClient(app).get("/full")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["message"].startswith("3 requests are waiting")
