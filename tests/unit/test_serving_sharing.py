"""The decoder's new powers on the tiny base: log-probabilities (sampled and prompt), n rows
sharing one prefill, prefix reuse, preemption, and a fair loop across namespaces."""

from __future__ import annotations

import threading
from typing import Any

import torch

from workers.serving.decode import DecodeRow, RowOutput, choice_seed
from workers.serving.decode_loop import DecodeLoop, Overloaded, TenantLimits, Ticket
from workers.serving.multi_lora import to_multi_lora
from workers.serving.prefix_cache import PrefixCache, prefix_root
from workers.serving.stepper import Live, StepDecoder, decode_batch

PROMPT = "spell 1 2 3 4 = and then spell 9 8 7 = and more words follow here"


def _steps(decoder: StepDecoder) -> list:
    reports = []
    while not decoder.idle:
        reports.append(decoder.step())
    return reports


def _reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_sampled_tokens_logprobs_are_the_raw_log_softmax_whatever_the_temperature(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    ids = tok(PROMPT)["input_ids"]
    for temperature in (0.0, 1.7):
        row = DecodeRow(ids, max_new_tokens=6, min_new_tokens=6, temperature=temperature,
                        seed=3, logprobs=5)  # fmt: skip
        out = decode_batch(model, tok, {}, [row])[0]
        assert len(out.logprobs) == 6
        full = _reference_logprobs(model, ids + out.token_ids)
        for i, entry in enumerate(out.logprobs):
            ref = full[len(ids) - 1 + i]
            assert entry.token == out.token_ids[i]
            assert abs(entry.logprob - float(ref[entry.token])) < 2e-3
            top = torch.topk(ref, 5)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert max(abs(lp - float(v)) for (_, lp), v in zip(entry.top, top.values,
                                                                 strict=True)) < 2e-3  # fmt: skip


def test_prompt_logprobs_cover_every_prompt_token_once_across_chunks(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    ids = tok(PROMPT * 2)["input_ids"]
    row = DecodeRow(ids, max_new_tokens=0, prompt_logprobs=2)
    decoder = StepDecoder(model, tok, {}, max_rows=2, kv_tokens=4096, prefill_chunk=7)
    seq = decoder.add(row)
    reports = _steps(decoder)
    assert len(reports) == -(-len(ids) // 7)  # chunked prefill, nothing decoded
    out = seq.out
    assert out.finish_reason == "length" and out.token_ids == []
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    full = _reference_logprobs(model, ids)
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert entry is not None and entry.token == ids[p]
        assert abs(entry.logprob - float(full[p - 1, ids[p]])) < 2e-3
        assert entry.top[0][0] == int(full[p - 1].argmax())


def test_n_rows_prefill_once_and_each_samples_as_alone(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    ids = tok(PROMPT)["input_ids"]
    rows = [DecodeRow(ids, max_new_tokens=8, temperature=1.0, seed=choice_seed(11, 0, j))
            for j in range(4)]  # fmt: skip
    decoder = StepDecoder(model, tok, {}, max_rows=4, kv_tokens=4096)
    seqs = [decoder.create(r) for r in rows]
    decoder.admit(seqs)
    reports = _steps(decoder)
    prefills = [f for r in reports for f in r.forwards if f[0] == "prefill"]
    assert prefills == [("prefill", 1, 1)]  # one row of the four prefilled the prompt
    texts = [s.out.text for s in seqs]
    assert texts == [decode_batch(model, tok, {}, [r])[0].text for r in rows]
    assert len(set(texts)) > 1  # each row its own seed


def test_a_cached_prefix_is_reused_under_its_adapter_only(base, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    paths = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    layers = to_multi_lora(model, paths, n_slots=1, max_rank=4)
    torch.manual_seed(0)
    for layer in layers.values():
        layer.load_slot(0, torch.randn(4, layer.base_layer.in_features) * 0.1,
                        torch.randn(layer.base_layer.out_features, 4) * 0.1, 1.0)  # fmt: skip
    cache = PrefixCache(block=8)
    decoder = StepDecoder(model, tok, layers, max_rows=4, kv_tokens=8192, prefix_cache=cache)
    ids = tok(PROMPT * 3)["input_ids"]
    base_root, adapter_root = prefix_root("fp", None, None), prefix_root("fp", "t/a:1", "d")

    def run(slot: int, root: bytes, prompt: list[int]) -> tuple[RowOutput, int]:
        seq = decoder.create(DecodeRow(prompt, slot=slot, max_new_tokens=5))
        n, kv = cache.take(root, prompt)
        decoder.admit([seq], reuse=n, prefix=kv, cache_key=("t/a:1" if slot >= 0 else "", root))
        prefilled = sum(r.prefill_tokens for r in _steps(decoder))
        assert prefilled == len(prompt) - n  # only what the cache did not hold
        return seq.out, n

    cold, n0 = run(0, adapter_root, ids)
    warm, n1 = run(0, adapter_root, ids + tok(" again")["input_ids"][:1])
    assert n0 == 0 and n1 == (len(ids) // 8) * 8 and n1 > 0.8 * len(ids)
    alone = decode_batch(model, tok, layers, [DecodeRow(ids + tok(" again")["input_ids"][:1],
                                                        slot=0, max_new_tokens=5)])[0]  # fmt: skip
    assert warm.text == alone.text  # reused KV decodes what a cold prefill does
    base_run, n2 = run(-1, base_root, ids)  # the base never reads the adapter's blocks
    assert n2 == 0 and cold.text != base_run.text
    assert cache.drop("t/a:1") > 0 and cache.peek(adapter_root, ids) == 0


def test_a_preempted_row_resumes_where_it_was(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    rows = [DecodeRow(tok(p)["input_ids"], max_new_tokens=12, min_new_tokens=12, temperature=t,
                      seed=5) for p, t in ((PROMPT, 0.0), ("spell 4 4 =", 0.9))]  # fmt: skip
    decoder = StepDecoder(model, tok, {}, max_rows=2, kv_tokens=4096)
    seqs = [decoder.create(r) for r in rows]
    for s in seqs:
        decoder.admit([s])
    for _ in range(5):
        decoder.step()
    decoder.preempt(seqs[1])
    assert seqs[1].index < 0 and len(seqs[1].out.token_ids) == 5
    decoder.step()
    decoder.admit([seqs[1]])  # re-prefills its prompt and 4 of its tokens, then goes on
    _steps(decoder)
    for s, r in zip(seqs, rows, strict=True):
        assert s.out.token_ids == decode_batch(model, tok, {}, [r])[0].token_ids


class _Counter:
    """Finished tickets by name, with the loop step each ended in."""

    def __init__(self, loop: DecodeLoop) -> None:
        self.loop, self.steps, self.done = loop, {}, threading.Event()
        self.expected = 0

    def ticket(self, row: DecodeRow, name: str, ns: str) -> Ticket:
        self.expected += 1

        def on_done(outs: list[RowOutput], error: Any) -> None:
            assert error is None, error
            self.steps[name] = self.loop.stats.steps
            if len(self.steps) == self.expected:
                self.done.set()

        return Ticket([row], None, on_done, namespace=ns)


def test_a_flooding_namespace_does_not_delay_another(base) -> None:  # type: ignore[no-untyped-def]
    """x fills every row with long requests and queues more; y's short request is admitted at
    once (x's newest row is preempted) and ends long before x's queue drains."""
    model, tok = base
    decoder = StepDecoder(model, tok, {}, max_rows=4, kv_tokens=8192)
    gate, go = threading.Event(), threading.Event()
    step = decoder.step

    def held(*args: Any) -> Any:
        gate.set()
        assert go.wait(30)
        return step(*args)

    decoder.step = held  # type: ignore[method-assign]
    loop = DecodeLoop(decoder, max_queue=64)
    counter = _Counter(loop)
    long = DecodeRow(tok("spell 1 =")["input_ids"], max_new_tokens=40, min_new_tokens=40)
    loop.submit([counter.ticket(long, f"x{i}", "x") for i in range(12)])
    assert gate.wait(30)
    short = DecodeRow(tok("spell 2 =")["input_ids"], max_new_tokens=3, min_new_tokens=3)
    loop.submit([counter.ticket(short, "y", "y")])
    go.set()
    assert counter.done.wait(120)
    loop.close()
    assert counter.steps["y"] <= 8  # admitted at the next step: prefill + 3 tokens
    assert loop.stats.preempted >= 1
    assert sorted(counter.steps.values())[-1] >= 3 * 40  # x's 12 × 40 tokens on 4 rows


def test_a_namespace_over_its_queue_cap_is_refused_alone(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    decoder = StepDecoder(model, tok, {}, max_rows=1, kv_tokens=4096)
    loop = DecodeLoop(decoder, max_queue=64, tenants=TenantLimits(max_queue=3))
    counter = _Counter(loop)
    row = DecodeRow(tok("spell 1 =")["input_ids"], max_new_tokens=2)
    loop.submit([counter.ticket(row, f"x{i}", "x") for i in range(3)])
    try:
        loop.submit([counter.ticket(row, "x3", "x")])
        raise AssertionError("x's fourth request was queued")
    except Overloaded as exc:
        assert "namespace x" in str(exc)
    counter.expected -= 1
    loop.submit([counter.ticket(row, "y0", "y")])  # y is not refused for x's flood
    assert counter.done.wait(60)
    loop.close()
    assert loop.stats.rejected == 1 and set(counter.steps) == {"x0", "x1", "x2", "y0"}


def test_live_rows_report_what_the_planner_needs(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    decoder = StepDecoder(model, tok, {}, max_rows=2, kv_tokens=4096)
    seq: Live = decoder.add(DecodeRow(tok(PROMPT)["input_ids"], max_new_tokens=3))
    (r,) = decoder.running()
    assert (r.rid, r.to_prefill, r.decoding) == (seq.rid, len(seq.context), False)
    decoder.step()
    (r,) = decoder.running()
    assert (r.to_prefill, r.decoding) == (0, True)
