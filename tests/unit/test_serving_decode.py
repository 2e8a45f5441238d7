"""The decode loop: per-row lengths, stop strings, seeded sampling, streaming deltas."""

from __future__ import annotations

from workers.generate import greedy_generate
from workers.serving.decode import DecodeRow, TextTracker
from workers.serving.stepper import decode_batch


class _CharTokenizer:
    """Decodes ids as characters (id 0 is a special token that is skipped)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


def test_text_tracker_holds_back_stop_prefixes_and_cuts_at_the_stop() -> None:
    t = TextTracker(_CharTokenizer(), ("END",))
    ids = [ord(c) for c in "hi ENDx"]
    deltas = [t.update(ids[: n + 1], final=False) for n in range(len(ids))]
    assert "".join(deltas) == "hi " and t.stopped and t.text == "hi "
    assert all("E" not in d for d in deltas)


def test_text_tracker_waits_for_whole_characters() -> None:
    t = TextTracker(_CharTokenizer(), ())
    assert t.update([ord("a")], final=False) == "a"
    assert t.update([ord("a"), 0xFFFD], final=False) == ""  # a half-decoded character
    assert t.update([ord("a"), ord("é")], final=True) == "é"
    assert t.text == "aé"


def test_rows_keep_their_own_length_and_match_generate(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    prompts = ["spell 1 2 =", "hello there", "spell 7 ="]
    lengths = (3, 7, 5)
    rows = [
        DecodeRow(tok(p)["input_ids"], max_new_tokens=n)
        for p, n in zip(prompts, lengths, strict=True)
    ]
    out = decode_batch(model, tok, {}, rows)
    for p, r, o in zip(prompts, rows, out, strict=True):
        assert len(o.token_ids) <= r.max_new_tokens
        assert o.finish_reason in ("stop", "length")
        # padded into a batch, each row decodes exactly what HF generate gives it alone
        assert o.text == greedy_generate(model, tok, [p], max_new_tokens=r.max_new_tokens)[0]


def test_stop_strings_and_streamed_deltas_add_up(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    ids = tok("the quick brown fox")["input_ids"]
    full = decode_batch(model, tok, {}, [DecodeRow(ids, max_new_tokens=12, min_new_tokens=12)])[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    streamed: list[str] = []
    out = decode_batch(model, tok, {}, [DecodeRow(ids, max_new_tokens=12, stop=(stop,))],
                       on_step=lambda d: streamed.append(d[0] or ""))  # fmt: skip
    assert out[0].text == full.text[: full.text.index(stop)]
    assert out[0].finish_reason == "stop"
    assert "".join(streamed) == out[0].text


def test_seeded_sampling_is_reproducible_whatever_the_batch(base) -> None:  # type: ignore[no-untyped-def]
    model, tok = base
    ids = tok("hello")["input_ids"]
    sampled = DecodeRow(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = decode_batch(model, tok, {}, [sampled])[0].text
    other = DecodeRow(tok("spell 3 =")["input_ids"], max_new_tokens=4, temperature=0.7, seed=1)
    together = decode_batch(model, tok, {}, [other, sampled])[1].text
    assert alone == together
    reseeded = DecodeRow(ids, max_new_tokens=10, temperature=1.0, seed=12)
    texts = {decode_batch(model, tok, {}, [reseeded])[0].text, alone}
    assert len(texts) == 2  # a different seed samples differently (tiny model, 10 tokens)


def test_a_row_whose_sampling_fails_fails_alone(base) -> None:  # type: ignore[no-untyped-def]
    """A seed out of range or a temperature too small to sample from fails that row only; the
    others decode exactly as they do alone."""
    model, tok = base
    ids = tuple(tok("spell 1 2 =")["input_ids"])
    good = DecodeRow(ids, max_new_tokens=6)
    seeded = DecodeRow(ids, max_new_tokens=6, temperature=0.7, seed=3)
    alone = [decode_batch(model, tok, {}, [r])[0].text for r in (good, seeded)]
    bad_seed = DecodeRow(ids, max_new_tokens=6, temperature=0.7, seed=2**64)
    tiny_temp = DecodeRow(ids, max_new_tokens=6, temperature=1e-40)
    out = decode_batch(model, tok, {}, [good, bad_seed, seeded, tiny_temp])
    assert [out[0].text, out[2].text] == alone
    assert out[0].error is None and out[2].error is None
    for failed in (out[1], out[3]):
        assert failed.error and failed.finish_reason == "error"
