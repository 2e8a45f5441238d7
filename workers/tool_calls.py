"""Tool calls: the one owner of their text format, in prompts, in grammars and in answers.

A model calls a function by writing a block in the Hermes format, which Qwen2.5, Hermes and
SmolLM3 are trained on and vLLM's ``hermes`` parser reads::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The trainer renders tool-use rows (``workers/datasets.py``) and the server renders requests
with the same ``render``, so an adapter learns exactly the format it is served in.

Prompts. When the base's chat template renders ``tools`` itself (it names the variable), it gets
the tools and the history in Hugging Face's convention (``arguments`` as objects). Otherwise —
SmolLM2's template, the default one — ``render`` writes them into plain messages, the
documented default: the functions' signatures in a system message (``TOOLS_PROMPT``, appended to
the caller's system message or put first), each earlier call as a block in its assistant turn,
and each ``role: "tool"`` result as ``<tool_response>…</tool_response>`` in a user turn
(consecutive results in one turn).

Grammars. ``grammar`` is a Lark grammar for llguidance: with ``tool_choice: "required"`` or a
named function the answer is one block (or several, when ``parallel_tool_calls``) and nothing
else; with ``auto`` the model writes free text, but once it opens ``<tool_call>`` the block must
name a known function with arguments that conform to its parameter schema (a lazy trigger), so
an adapter cannot emit a broken call. JSON inside a block is compact, name first.

Answers. ``ToolCallStream`` parses decoded text incrementally into content and calls, streamed
as OpenAI streams them (a call's id, type and name first, then its arguments in fragments);
``parse`` runs the same parser over a whole answer, so a streamed and an unstreamed answer
agree. A block that is not a call (bad JSON, an unknown name) stays content. Pure functions and
plain classes: no HTTP, no Ray, no tokenizer.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Mode = Literal["none", "auto", "required"]

TOOLS_PROMPT = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


class ToolError(ValueError):
    """A ``tools``/``tool_choice``/message problem; the message starts with the field."""


@dataclass(frozen=True)
class Function:
    """One callable function: its name, description and parameter schema (JSON text)."""

    name: str
    parameters: str  # canonical JSON of the parameter schema
    description: str = ""

    def spec(self) -> dict[str, Any]:
        """The ``{"type": "function", "function": {...}}`` object, as OpenAI's ``tools``."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` and ``tool_choice`` ask: which functions the model may call
    (``functions``: all tools under ``auto``, the named one under a named choice), whether it
    must (``mode``), and whether it may call several at once."""

    tools: tuple[Function, ...]
    mode: Mode
    functions: tuple[Function, ...]
    parallel: bool = True

    @property
    def parses(self) -> bool:
        """Whether answers are parsed for calls (not under ``none``)."""
        return self.mode != "none" and bool(self.functions)

    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)


def parse_tools(tools: Any) -> tuple[Function, ...]:
    """OpenAI's ``tools``: a list of ``{"type": "function", "function": {name, description,
    parameters, strict}}``.

    Raises:
        ToolError: naming the element (``tools[2].function.name: …``).
    """
    from workers.serving.grammar import GrammarError, canonical_schema  # (it imports this)

    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ToolError("tools: a list of {type: function, function: {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools: {len(tools)} tools; at most {MAX_TOOLS}")
    out: list[Function] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolError(f"{where}.type: only 'function' tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function: an object with name and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name: 1 to 64 letters, digits, _ or -")
        if name in seen:
            raise ToolError(f"{where}.function.name: {name!r} is given twice")
        seen.add(name)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description: a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters: a JSON schema object")
        try:  # size and depth refused here, before anything renders the tools
            canonical_schema(params, part=f"{where}.function.parameters")
        except GrammarError as exc:
            raise ToolError(str(exc)) from None
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolError(f"{where}.function.strict: true or false")
        # the caller's key order kept: the grammar writes properties in schema order
        text = json.dumps(params, separators=(",", ":"))
        out.append(Function(name, text, description))
    return tuple(out)


def plan(tools: Any, tool_choice: Any, parallel_tool_calls: Any = None) -> ToolPlan | None:
    """The plan for a request's tool fields (None: no tools and no choice).

    ``tool_choice`` defaults to ``auto`` with tools and ``none`` without, as OpenAI's does.

    Raises:
        ToolError: naming the field.
    """
    functions = parse_tools(tools)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls: true or false")
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if tool_choice in ("none", "auto", "required"):
        mode: Mode = tool_choice
        chosen = functions
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError('tool_choice: {"type": "function", "function": {"name": …}}')
        chosen = tuple(f for f in functions if f.name == name)
        if not chosen:
            raise ToolError(f"tool_choice: no tool is named {name[:64]!r}")
        mode, parallel = "required", False  # a named function is called once
    else:
        raise ToolError("tool_choice: none, auto, required or a named function")
    if mode != "none" and not functions:
        raise ToolError(f"tool_choice: {mode!r} needs tools")
    if not functions:
        return None
    return ToolPlan(functions, mode, chosen, parallel)


# -- grammars ---------------------------------------------------------------------------------
def call_schema(functions: Sequence[Function]) -> dict[str, Any]:
    """The JSON schema of one block's object: a known name, then arguments conforming to that
    function's parameters (compact JSON)."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": json.loads(f.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    one = options[0] if len(options) == 1 else {"anyOf": options}
    return {**one, "x-guidance": {"whitespace_flexible": False}}


def grammar(p: ToolPlan, schema: dict[str, Any] | None = None) -> str:
    """The Lark grammar (llguidance's dialect) that decoding under ``p`` follows; with
    ``schema`` (a ``response_format``) under ``auto``, the answer is either a conforming JSON
    document or calls."""
    body = f'"\\n" %json {json.dumps(call_schema(p.functions))} "\\n{CLOSE}"'
    calls = 'call ("\\n" call)*' if p.parallel else "call"
    if p.mode == "required":
        return f'%llguidance {{}}\nstart: {calls}\ncall: "{OPEN}" {body}\n'
    if schema is not None:
        answer = json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})
        return (f'%llguidance {{}}\nstart: answer | {calls}\nanswer: %json {answer}\n'
                f'call: "{OPEN}" {body}\n')  # fmt: skip
    # auto: free text; an opened block must be a valid call (the trigger is lazy: the text
    # lexeme ends at the first "<tool_call>")
    start = "call* tail" if p.parallel else "tail | call"
    return (
        f"%llguidance {{}}\nstart: {start}\ntail: TEXT\nTEXT: /(.|\\n)*/\n"
        f'call_open[lazy]: TEXT "{OPEN}"\ncall: call_open {body}\n'
    )


# -- prompts ----------------------------------------------------------------------------------
def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _arguments(raw: Any) -> Any:
    if not isinstance(raw, str):  # an object already (Hugging Face's form)
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def block(name: str, arguments: Any) -> str:
    """One call as the model writes it (compact, as the grammar makes it)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                      separators=(",", ":"))  # fmt: skip
    return f"{OPEN}\n{call}\n{CLOSE}"


def renders_tools(template: str) -> bool:
    """Whether a chat template renders ``tools`` itself (it names the variable)."""
    return re.search(r"\btools\b", template) is not None


def render(
    messages: Sequence[dict[str, Any]], tools: Sequence[Function], *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and the ``tools`` argument) for the chat template.

    ``messages`` are OpenAI's (``content`` a string, parts or None; assistant ``tool_calls``;
    ``role: "tool"`` with ``tool_call_id``). ``native``: the template renders tools itself.
    """
    if native:
        out = []
        for m in messages:
            item: dict[str, Any] = {"role": m["role"], "content": _text(m.get("content"))}
            if m.get("tool_calls"):
                item["tool_calls"] = [
                    {"type": "function", "id": c.get("id"),
                     "function": {"name": c["function"]["name"],
                                  "arguments": _arguments(c["function"].get("arguments", {}))}}
                    for c in m["tool_calls"]
                ]  # fmt: skip
            if m["role"] == "tool":
                item["tool_call_id"] = m.get("tool_call_id")
            out.append(item)
        return out, ([f.spec() for f in tools] or None)
    plain: list[dict[str, Any]] = []
    for m in messages:
        role, text = m["role"], _text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            blocks = [block(c["function"]["name"], _arguments(c["function"].get("arguments", {})))
                      for c in m["tool_calls"]]  # fmt: skip
            text = "\n".join([text, *blocks] if text else blocks)
        if role == "tool":
            response = f"<tool_response>\n{text}\n</tool_response>"
            if plain and plain[-1].get("_results"):
                plain[-1]["content"] += "\n" + response
                continue
            plain.append({"role": "user", "content": response, "_results": True})
            continue
        plain.append({"role": role, "content": text})
    for m in plain:
        m.pop("_results", None)
    if tools:
        specs = "\n".join(json.dumps(f.spec(), ensure_ascii=False) for f in tools)
        prompt = TOOLS_PROMPT.format(tools=specs)
        if plain and plain[0]["role"] == "system":
            plain[0]["content"] = f"{plain[0]['content']}\n\n{prompt}"
        else:
            plain.insert(0, {"role": "system", "content": prompt})
    return plain, None


def check_history(messages: Sequence[dict[str, Any]]) -> None:
    """Every ``role: "tool"`` message answers a call of an earlier assistant turn, by id.

    Raises:
        ToolError: naming the message.
    """
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            open_ids = {c["id"] for c in m.get("tool_calls") or ()}
        elif m["role"] == "tool":
            if m.get("tool_call_id") not in open_ids:
                raise ToolError(f"messages[{i}].tool_call_id: answers no tool call of the "
                                "assistant turn before it")  # fmt: skip
        else:
            open_ids = set()


# -- answers ----------------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """A parsed call: OpenAI's ``{"id", "type": "function", "function": {name, arguments}}``."""

    id: str
    name: str
    arguments: str = ""

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


Event = tuple[str, Any]  # ("content", text) | ("call", (index, ToolCall)) | ("args", (index, text))
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


@dataclass
class _Block:
    """An open ``<tool_call>`` block: its text so far and how far its arguments went."""

    text: str = ""
    call: ToolCall | None = None  # set once its header (name) is read
    args_at: int = 0  # where the arguments start in ``text``
    scanned: int = 0  # how much of the arguments is scanned (and sent)
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    done: bool = False  # the arguments' value is complete


def _scan(b: _Block) -> str:
    """The next fragment of ``b``'s arguments (a JSON value), stopping where it ends."""
    start = b.args_at + b.scanned
    i = start
    while i < len(b.text) and not b.done:
        ch = b.text[i]
        i += 1
        if b.in_string:
            if b.escape:
                b.escape = False
            elif ch == "\\":
                b.escape = True
            elif ch == '"':
                b.in_string = False
                b.done = b.depth == 0
        elif ch == '"':
            b.in_string = True
        elif ch in "{[":
            b.depth += 1
        elif ch in "}]":
            b.depth -= 1
            b.done = b.depth == 0
        elif b.depth == 0 and ch in ",}":  # a bare scalar ended (not from our grammar)
            i -= 1
            b.done = True
    b.scanned = i - b.args_at
    return b.text[start:i]


@dataclass
class ToolCallStream:
    """Incremental parse of one choice's answer into content and tool calls (see module doc).

    ``feed`` takes new text and returns events; ``close`` ends the answer. Content is the
    text outside blocks with leading and trailing whitespace removed; without ``parallel``,
    blocks after the first call are dropped.
    """

    names: frozenset[str]
    parallel: bool = True
    calls: list[ToolCall] = field(default_factory=list)
    _pending: str = ""  # text not yet judged (may start a block tag)
    _held_space: str = ""  # trailing whitespace of content, sent only if content follows
    _content_started: bool = False
    _block: _Block | None = None

    def _content(self, text: str) -> list[Event]:
        if not self._content_started:
            text = text.lstrip()
            if not text:
                return []
        body = text.rstrip()
        if not body:
            self._held_space += text
            return []
        out = self._held_space + body
        self._held_space = text[len(body) :]
        self._content_started = True
        return [("content", out)]

    def _accepts_calls(self) -> bool:
        return self.parallel or not self.calls

    def feed(self, text: str) -> list[Event]:
        """Events for ``text`` appended to the answer."""
        events: list[Event] = []
        self._pending += text
        while self._pending:
            if self._block is None:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._pending, OPEN)
                    events += self._content(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    return events
                events += self._content(self._pending[:at])
                self._pending = self._pending[at + len(OPEN) :]
                self._block = _Block()
                continue
            b = self._block
            end = self._pending.find(CLOSE)
            piece = self._pending if end < 0 else self._pending[:end]
            if end < 0:  # keep a possible partial close tag out of the block
                keep = _partial_suffix(piece, CLOSE)
                piece = piece[: len(piece) - keep]
            b.text += piece
            self._pending = self._pending[len(piece) :]
            events += self._progress(b)
            if end < 0:
                return events
            self._pending = self._pending[len(CLOSE) :]
            events += self._end_block(b)
            self._block = None
        return events

    def _progress(self, b: _Block) -> list[Event]:
        events: list[Event] = []
        if b.call is None and self._accepts_calls():
            m = HEADER.match(b.text)
            # stream only an object's arguments; anything else is judged when the block ends
            if m and m.group(1) in self.names and b.text[m.end() : m.end() + 1] == "{":
                b.call, b.args_at = ToolCall(new_call_id(), m.group(1)), m.end()
                self.calls.append(b.call)
                events.append(("call", (len(self.calls) - 1, b.call)))
        if b.call is not None and not b.done:
            fragment = _scan(b)
            if fragment:
                b.call.arguments += fragment
                events.append(("args", (len(self.calls) - 1, fragment)))
        return events

    def _end_block(self, b: _Block) -> list[Event]:
        """A closed block: a call if it parses as one, else its text is content."""
        if b.call is not None:
            return []
        parsed = _parse_block(b.text, self.names)
        if parsed is None:
            return self._content(f"{OPEN}{b.text}{CLOSE}")
        if not self._accepts_calls():
            return []  # a second call where only one is allowed: dropped
        call = ToolCall(new_call_id(), parsed[0], parsed[1])
        self.calls.append(call)
        i = len(self.calls) - 1
        return [("call", (i, ToolCall(call.id, call.name))), ("args", (i, call.arguments))]

    def close(self) -> list[Event]:
        """Events for the end of the answer: text held back, an unclosed block without a
        call (its text is content)."""
        events: list[Event] = []
        b, self._block = self._block, None
        if b is not None:
            b.text += self._pending
            self._pending = ""
            if b.call is None:
                events += self._content(f"{OPEN}{b.text}")
            else:
                events += self._progress(b)
        elif self._pending:
            events += self._content(self._pending)
            self._pending = ""
        return events


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _parse_block(text: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a block's text, if it is a call of a known function."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return str(obj["name"]), args
    return str(obj["name"]), json.dumps(args, ensure_ascii=False, separators=(",", ":"))


def finish_reason(calls: Sequence[ToolCall], reason: str | None) -> str | None:
    """OpenAI's finish reason for an answer: ``tool_calls`` when it made calls and the model
    stopped by itself (a cut answer keeps ``length``)."""
    return "tool_calls" if calls and reason == "stop" else reason


def parse(text: str, p: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content (None when empty) and calls, as ``ToolCallStream`` streams
    them."""
    stream = ToolCallStream(p.names(), p.parallel)
    events = stream.feed(text) + stream.close()
    content = "".join(e[1] for e in events if e[0] == "content")
    return (content or None), stream.calls
