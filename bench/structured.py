"""Structured outputs: the decoding cost of a JSON-schema mask per row.

SmolLM2-135M-Instruct (float32), the serving engine alone (no HTTP), one thread: a batch of 8
rows constrained by a 6-field JSON schema against the same 8 prompts unconstrained, each row
decoding 48 tokens (EOS is held back for both, so both decode the same number of steps; the
constrained rows' grammar never finishes inside 48 tokens: a long free-text field). A third
system is the same 8 rows offered two tools under ``tool_choice: "auto"`` (the mask that
lets text through and would constrain an opened ``<tool_call>``: what every tools request
pays while the model writes text). Rounds A B C A B C …, 5 after a warm-up; the figures are
tokens/s constrained (and tools) over unconstrained. Goal (issue 29): ≥ 0.85×. Writes
``bench/results/structured.json``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ROUNDS, ROWS, TOKENS = 5, 8, 48
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "story": {"type": "string"},
                         "age": {"type": "integer"}, "kind": {"enum": ["cat", "dog", "bird"]},
                         "happy": {"type": "boolean"}, "tags": {"type": "array",
                                                                "items": {"type": "string"}}},
          "required": ["story", "name", "age", "kind", "happy", "tags"]}  # fmt: skip


TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name in ("get_weather", "get_time")]  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    from bench.serving_features import _base
    from workers import tool_calls
    from workers.base_model import load_base
    from workers.serving.decode import DecodeRow
    from workers.serving.grammar import GrammarCache
    from workers.serving.openai_api import ChatMessage, chat_prompt_ids
    from workers.serving.stepper import decode_batch

    base_dir, model_name = _base(Path(tempfile.mkdtemp(prefix="lorafleet-bench-structured-")))
    model, tok = load_base(base_dir)
    cache = GrammarCache(tok)
    compiled = cache.compiled(SCHEMA)
    plan = tool_calls.plan(TOOLS, "auto")
    assert plan is not None
    tools = cache.compiled_tools(plan)
    prompts = [chat_prompt_ids(tok, [ChatMessage(role="user", content=f"Tell story {i} as JSON.")])
               for i in range(ROWS)]  # fmt: skip

    def rows(grammar: Any) -> list[DecodeRow]:
        return [DecodeRow(prompt_ids=p, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                          temperature=1.0, seed=i, deltas=False, grammar=grammar)
                for i, p in enumerate(prompts)]  # fmt: skip

    def run(grammar: Any) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            outs = decode_batch(model, tok, {}, rows(grammar))
        tokens = sum(len(o.token_ids) for o in outs)
        return tokens / (time.perf_counter() - t0)

    run(compiled), run(tools), run(None)  # warm-up
    constrained: list[float] = []
    offered: list[float] = []
    free: list[float] = []
    for _ in range(ROUNDS):
        constrained.append(run(compiled))
        offered.append(run(tools))
        free.append(run(None))

    def spread(xs: list[float]) -> dict[str, float]:
        ratios = [x / f for x, f in zip(xs, free, strict=True)]
        return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}

    result = {
        "model": model_name, "environment": environment(1), "rounds": ROUNDS, "rows": ROWS,
        "tokens_per_row": TOKENS,
        "tokens_per_s": {"constrained": median(constrained), "tools_auto": median(offered),
                         "free": median(free)},
        "constrained_over_free": spread(constrained),
        "tools_auto_over_free": spread(offered),
    }  # fmt: skip
    path = write_result("structured", result)
    for key in ("constrained_over_free", "tools_auto_over_free"):
        r = result[key]
        print(f"{key}: {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})")
    print(f"→ {path}")


if __name__ == "__main__":
    main()
