"""Training data as JSON Lines, tokenized into (input_ids, labels) with loss masks.

Three row formats, one per line:

- ``{"text": "..."}``: language modelling on the whole text;
- ``{"prompt": "...", "completion": "..."}``: loss on the completion only;
- ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}``: chat,
  rendered with the tokenizer's chat template (or ``DEFAULT_CHAT_TEMPLATE``: ``role: content``
  per line, assistant turns closed by EOS); loss on the assistant turns only. Tool use in
  OpenAI's fine-tuning form — ``"tools": [...]`` beside the messages, assistant turns with
  ``tool_calls`` (content null), ``role: "tool"`` results — is rendered by ``workers.tool_calls``
  exactly as the server renders it, so the loss covers the calls an adapter will be served
  making.

Every error names the file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import tool_calls
from workers.errors import DatasetError

IGNORE_INDEX = -100  # label value that cross-entropy skips
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class Example:
    """One tokenized row: labels are IGNORE_INDEX where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def check_messages(msgs: Any, where: str, field: str = "messages", *,
                   tools: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """A chat: a non-empty list of ``{"role", "content"}`` with known roles; with ``tools``,
    also assistant ``tool_calls`` (content may then be null) and ``role: "tool"`` results.

    Raises:
        DatasetError: naming ``where`` and the offending message.
    """
    roles = (*ROLES, "tool") if tools else ROLES
    if not isinstance(msgs, list) or not msgs:
        raise DatasetError(f"{where}: '{field}' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise DatasetError(f"{where}: {field}[{i}].role must be one of {', '.join(roles)}")
        calls = m.get("tool_calls") if tools else None
        if calls is not None:
            _check_calls(calls, m["role"], where, f"{field}[{i}].tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise DatasetError(f"{where}: {field}[{i}].content must be a string")
    return msgs


def _check_calls(calls: Any, role: str, where: str, field: str) -> None:
    if role != "assistant" or not isinstance(calls, list) or not calls:
        raise DatasetError(f"{where}: {field} must be a non-empty list on an assistant turn")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DatasetError(f"{where}: {field}[{j}].function.name must be a string")
        if not isinstance(fn.get("arguments", "{}"), str | dict):
            raise DatasetError(f"{where}: {field}[{j}].function.arguments must be a JSON "
                               "string or an object")  # fmt: skip


def validate_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    keys = set(row)
    if "text" in keys:
        if not isinstance(row["text"], str) or not row["text"]:
            raise DatasetError(f"{where}: 'text' must be a non-empty string")
    elif {"prompt", "completion"} <= keys:
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                raise DatasetError(f"{where}: {k!r} must be a string")
        if not row["completion"]:
            raise DatasetError(f"{where}: 'completion' must not be empty")
    elif "messages" in keys:
        msgs = check_messages(row["messages"], where, tools=True)
        try:
            tool_calls.parse_tools(row.get("tools"))
        except tool_calls.ToolError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        if not any(m["role"] == "assistant" for m in msgs):
            raise DatasetError(f"{where}: 'messages' has no assistant turn to learn from")
    else:
        raise DatasetError(
            f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' row, got keys "
            f"{sorted(keys)}"
        )
    return row


MAX_LINE_BYTES = 8 * 1024**2  # one row at most: what reading a row holds in memory (≈ 3×)


class LineTooLong(DatasetError):
    """A row is longer than the per-line cap (``LORAFLEET_MAX_LINE_BYTES``)."""


def _lines(fh: Any, max_line: int, shown: str) -> Iterator[bytes]:
    """A binary file's lines, none read past ``max_line`` bytes (memory stays bounded)."""
    lineno = 0
    while raw := fh.readline(max_line + 1):
        lineno += 1
        if len(raw) > max_line and not raw.endswith(b"\n"):
            raise LineTooLong(f"{shown}:{lineno}: the line is longer than {max_line:,} bytes "
                              "(LORAFLEET_MAX_LINE_BYTES)")  # fmt: skip
        yield raw


RowCheck = Callable[[Any, str], dict[str, Any]]  # (row, "file:line") → the row, or DatasetError


def _rows(path: str | Path, name: str | None, max_line: int = MAX_LINE_BYTES,
          check: RowCheck | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Validated rows of a JSONL file, one at a time; errors say ``name:line``."""
    check = check or validate_row
    p = Path(path)
    shown = name or str(p)
    if not p.is_file():
        raise DatasetError(f"dataset {shown} does not exist")
    with p.open("rb") as fh:
        for lineno, raw in enumerate(_lines(fh, max_line, shown), start=1):
            where = f"{shown}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DatasetError(f"{where}: not valid UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: malformed JSON ({exc.msg})") from None
            yield check(row, where)


def read_jsonl(
    path: str | Path, *, name: str | None = None, check: RowCheck | None = None
) -> list[dict[str, Any]]:
    """Read and validate a JSONL dataset.

    Args:
        name: how errors call the file (an upload's own file name, never a server path).
        check: validates one row (default: a supervised row).

    Raises:
        DatasetError: missing file, empty file, or a malformed line (``file:line: reason``).
    """
    rows = list(_rows(path, name, check=check))
    if not rows:
        raise DatasetError(f"dataset {name or path} has no rows")
    return rows


def count_valid_rows(
    path: str | Path, *, name: str | None = None, max_line: int = MAX_LINE_BYTES,
    check: RowCheck | None = None,
) -> int:  # fmt: skip
    """Validate every row (as ``read_jsonl``) without keeping them; returns the row count.

    Raises:
        DatasetError (``LineTooLong`` for a row over ``max_line`` bytes).
    """
    n = sum(1 for _ in _rows(path, name, max_line, check))
    if not n:
        raise DatasetError(f"dataset {name or path} has no rows")
    return n


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def chat_segments(
    tokenizer: Any, messages: list[dict[str, Any]], *, trainable_from: int = 0,
    tools: list[dict[str, Any]] | None = None,
) -> list[tuple[list[int], bool]]:  # fmt: skip
    """Token segments per message (prefix-difference of the rendered chat), flagged trainable:
    the assistant turns from message ``trainable_from`` on (their role headers excluded).
    ``tools``: for a template that renders them itself."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    extra = {"tools": tools} if tools else {}
    segments: list[tuple[list[int], bool]] = []
    previous: list[int] = []
    for i, message in enumerate(messages):
        ids = list(
            tokenizer.apply_chat_template(
                messages[: i + 1],
                chat_template=template,
                tokenize=True,
                return_dict=False,
                **extra,
            )
        )
        if ids[: len(previous)] != previous:
            raise DatasetError(
                "the tokenizer's chat template does not render conversations prefix-stably; "
                "use prompt/completion rows instead"
            )
        start = len(previous)
        if message["role"] == "assistant":
            # The role header ("assistant:") is prompt, not answer: find where the generation
            # prompt for this turn ends and take the loss only after it.
            header = (
                list(
                    tokenizer.apply_chat_template(
                        messages[:i],
                        chat_template=template,
                        tokenize=True,
                        return_dict=False,
                        add_generation_prompt=True,
                        **extra,
                    )
                )
                if i
                else []
            )
            if len(header) > start and ids[: len(header)] == header:
                segments.append((header[start:], False))
                start = len(header)
        segments.append((ids[start:], message["role"] == "assistant" and i >= trainable_from))
        previous = ids
    return segments


def tokenize_row(row: dict[str, Any], tokenizer: Any) -> Example:
    """Tokenize one validated row, masking the labels where no loss is taken."""
    eos = tokenizer.eos_token_id
    if "text" in row:
        ids = [*_encode(tokenizer, row["text"], special=True), eos]
        return Example(tuple(ids), tuple(ids))
    if "prompt" in row:
        prompt = _encode(tokenizer, row["prompt"], special=True)
        completion = [*_encode(tokenizer, row["completion"], special=False), eos]
        return Example(tuple(prompt + completion), tuple([IGNORE_INDEX] * len(prompt) + completion))
    messages, specs = row["messages"], None
    if "tools" in row or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        messages, specs = tool_calls.render(messages, tool_calls.parse_tools(row.get("tools")),
                                            native=tool_calls.renders_tools(template))  # fmt: skip
    ids_all: list[int] = []
    labels: list[int] = []
    for seg, trainable in chat_segments(tokenizer, messages, tools=specs):
        ids_all += seg
        labels += seg if trainable else [IGNORE_INDEX] * len(seg)
    return Example(tuple(ids_all), tuple(labels))


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, *, seq_len: int) -> list[Example]:
    """Tokenize and truncate to ``seq_len``; rows left with no target token are dropped.

    Raises:
        DatasetError: every row was dropped (``seq_len`` too small for the data).
    """
    if seq_len < 2:
        raise DatasetError(f"seq_len must be at least 2, got {seq_len}")
    out = []
    for row in rows:
        ex = tokenize_row(row, tokenizer)
        ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if ex.n_target_tokens:
            out.append(ex)
    if not out:
        raise DatasetError(f"no row has a target token within seq_len={seq_len}")
    return out


def load_dataset(
    path: str | Path, tokenizer: Any, *, seq_len: int, name: str | None = None
) -> list[Example]:
    """``read_jsonl`` then ``tokenize_rows`` (``name``: how errors call the file)."""
    return tokenize_rows(read_jsonl(path, name=name), tokenizer, seq_len=seq_len)
