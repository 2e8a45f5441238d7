"""Training rows beyond supervised ones, in OpenAI's fine-tuning formats.

- Preference rows (DPO)::

    {"input": {"messages": [...]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

  Each side is tokenized as the full chat (prompt + that output) with labels on the output's
  assistant turns only, so a pair's two rows share their prompt tokens exactly.
- Prompt rows (reinforcement): ``{"messages": [...], <any fields a grader references>}``, the
  chat the policy answers (ending in a user turn) and the fields its grader reads.

An upload is checked with ``validate_any_row`` (any supported row); a job checks its file with
its method's own rule before any training. Every error names the file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.datasets import (
    IGNORE_INDEX,
    Example,
    chat_segments,
    check_messages,
    read_jsonl,
    validate_row,
)
from workers.errors import DatasetError

PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a non-preferred answer, each tokenized as a full row
    (labels on the answer only)."""

    chosen: Example
    rejected: Example


def validate_preference_row(row: Any, where: str) -> dict[str, Any]:
    """A DPO row in OpenAI's preference format.

    Raises:
        DatasetError: ``file:line: reason``.
    """
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    missing = [k for k in PREFERENCE_KEYS if k not in row]
    if missing:
        raise DatasetError(f"{where}: a preference row needs {', '.join(PREFERENCE_KEYS)}; "
                           f"missing {', '.join(missing)}")  # fmt: skip
    if not isinstance(row["input"], dict):
        raise DatasetError(f"{where}: 'input' must be an object with 'messages'")
    prompt = check_messages(row["input"].get("messages"), where, "input.messages")
    if prompt[-1]["role"] == "assistant":
        raise DatasetError(f"{where}: input.messages must end with a user or system turn")
    for side in PREFERENCE_KEYS[1:]:
        out = check_messages(row[side], where, side)
        if any(m["role"] != "assistant" for m in out):
            raise DatasetError(f"{where}: {side} must hold assistant messages only")
        if not any(m["content"] for m in out):
            raise DatasetError(f"{where}: {side} is empty")
    return row


def validate_prompt_row(row: Any, where: str) -> dict[str, Any]:
    """A reinforcement row: ``messages`` ending in a user (or system) turn, plus any fields.

    Raises:
        DatasetError: ``file:line: reason``.
    """
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    if "messages" not in row:
        raise DatasetError(f"{where}: a reinforcement row needs 'messages' (the prompt)")
    msgs = check_messages(row["messages"], where)
    if msgs[-1]["role"] == "assistant":
        raise DatasetError(f"{where}: messages must end with the user's turn, which the policy "
                           "answers")  # fmt: skip
    return row


def validate_any_row(row: Any, where: str) -> dict[str, Any]:
    """Any supported training row (an upload's check: its method is not known yet)."""
    if isinstance(row, dict) and any(k in row for k in PREFERENCE_KEYS):
        return validate_preference_row(row, where)
    if (isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]
            and not any(isinstance(m, dict) and m.get("role") == "assistant"
                        for m in row["messages"])):  # fmt: skip
        return validate_prompt_row(row, where)
    return validate_row(row, where)


def _side(tokenizer: Any, prompt: list[dict[str, str]], output: list[dict[str, str]]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for seg, trainable in chat_segments(tokenizer, prompt + output, trainable_from=len(prompt)):
        ids += seg
        labels += seg if trainable else [IGNORE_INDEX] * len(seg)
    return Example(tuple(ids), tuple(labels))


def tokenize_pair(row: dict[str, Any], tokenizer: Any, *, seq_len: int) -> PreferencePair | None:
    """A validated preference row as a pair of rows, truncated to ``seq_len``; None when
    truncation leaves either side without an answer token."""
    prompt = row["input"]["messages"]
    sides = []
    for key in PREFERENCE_KEYS[1:]:
        ex = _side(tokenizer, prompt, row[key])
        ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if not ex.n_target_tokens:
            return None
        sides.append(ex)
    return PreferencePair(sides[0], sides[1])


def load_preferences(
    path: str | Path, tokenizer: Any, *, seq_len: int, name: str | None = None
) -> list[PreferencePair]:
    """Read, validate and tokenize a DPO file.

    Raises:
        DatasetError: a bad row (``file:line``), or no pair with an answer within ``seq_len``.
    """
    rows = read_jsonl(path, name=name, check=validate_preference_row)
    pairs = [p for p in (tokenize_pair(r, tokenizer, seq_len=seq_len) for r in rows) if p]
    if not pairs:
        raise DatasetError(f"no preference pair has an answer within seq_len={seq_len}")
    return pairs


def load_prompts(path: str | Path, *, name: str | None = None) -> list[dict[str, Any]]:
    """Read and validate a reinforcement file (rows stay JSON: graders read their fields)."""
    return read_jsonl(path, name=name, check=validate_prompt_row)


def field_names(rows: Sequence[dict[str, Any]]) -> set[str]:
    """The fields every row has (what a grader's template may reference)."""
    common = set(rows[0]) if rows else set()
    for r in rows[1:]:
        common &= set(r)
    return common
