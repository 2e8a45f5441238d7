"""JSONL rows: three formats, loss masks, and errors that name the line."""

from __future__ import annotations

import json

import pytest

from workers.datasets import IGNORE_INDEX, load_dataset, read_jsonl, tokenize_row
from workers.errors import DatasetError


def _write(tmp_path, lines):  # type: ignore[no-untyped-def]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_prompt_completion_masks_the_prompt(base):
    _, tok = base
    ex = tokenize_row({"prompt": "spell 1 2 =", "completion": " one two"}, tok)
    n_prompt = len(tok("spell 1 2 =")["input_ids"])
    assert ex.labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]) == " one two"


def test_text_trains_on_everything(base):
    _, tok = base
    ex = tokenize_row({"text": "hello world"}, tok)
    assert ex.labels == ex.input_ids


def test_messages_train_on_assistant_content_only(base):
    _, tok = base
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "spell 3"},
            {"role": "assistant", "content": "three"},
        ]
    }
    ex = tokenize_row(row, tok)
    trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    text = tok.decode(trained)
    assert text.strip().startswith("three") and "spell" not in text and "assistant" not in text
    assert tok.eos_token_id in trained


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a"', "malformed JSON"),
        ('["a"]', "JSON object"),
        ('{"foo": 1}', "expected a 'text'"),
        ('{"prompt": "a", "completion": ""}', "completion"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, line, message):
    good = json.dumps({"text": "ok"})
    path = _write(tmp_path, [good, good, line])
    with pytest.raises(DatasetError, match=f"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_truncation_drops_rows_without_targets(tmp_path, base):
    _, tok = base
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "a " * 50, "completion": " b"}),
            json.dumps({"prompt": "a", "completion": " b"}),
        ],
    )
    assert len(load_dataset(path, tok, seq_len=8)) == 1
    with pytest.raises(DatasetError, match="seq_len"):
        load_dataset(
            _write(tmp_path, [json.dumps({"prompt": "a " * 50, "completion": " b"})]),
            tok,
            seq_len=8,
        )


def test_bundled_demo_files_match_the_generator():
    from workers.demo_task import HELDOUT_FILE, TRAIN_FILE, make_splits

    train, heldout = make_splits()
    assert read_jsonl(TRAIN_FILE) == train
    assert read_jsonl(HELDOUT_FILE) == heldout
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
