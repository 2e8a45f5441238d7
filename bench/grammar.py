"""Grammar libraries for constrained decoding, compared on SmolLM2's tokenizer (49,152 tokens).

For a 20-field JSON schema (strings of ≤ 8 characters and integers, all required): the time to
compile it (a distinct schema each time: no cache), and the time of one decoding step's mask
(fill the row's bitmask and apply it to the logits) along a 200-step walk over random logits,
one CPU thread. llguidance (the dependency) against xgrammar when it is importable (not a
dependency: it brings triton on Linux); paired rounds A B A B …, 7 rounds. Also our cache:
its hit rate when 8 distinct schemas are asked 400 times with a skewed popularity.

Writes ``bench/results/grammar.json``.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ROUNDS, STEPS = 7, 200


def _schema(k: int) -> dict[str, Any]:
    return {"type": "object", "title": f"s{k}", "additionalProperties": False,
            "properties": {f"f{i}": ({"type": "integer"} if i % 2 else
                                     {"type": "string", "maxLength": 8}) for i in range(20)},
            "required": [f"f{i}" for i in range(20)]}  # fmt: skip


def _llguidance(tok: Any) -> Any:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lt = llguidance.hf.from_tokenizer(tok)

    def compile_(k: int) -> Any:
        return llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(_schema(k))))  # fmt: skip

    def walk(m: Any, logits: list[torch.Tensor]) -> list[float]:
        bm = llguidance.torch.allocate_token_bitmask(1, lt.vocab_size)
        times = []
        for lg in logits:
            row = lg.clone()[None]
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, bm, 0)
            llguidance.torch.apply_token_bitmask_inplace(row, bm)
            times.append(time.perf_counter() - t0)
            t = int(row.argmax())
            if m.is_stopped() or t == tok.eos_token_id:
                break
            m.consume_token(t)
        return times

    return compile_, walk


def _xgrammar(tok: Any) -> Any:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_(k: int) -> Any:
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(_schema(k))))

    def walk(m: Any, logits: list[torch.Tensor]) -> list[float]:
        bm = xgr.allocate_token_bitmask(1, info.vocab_size)
        times = []
        for lg in logits:
            row = lg.clone()[None]
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bm)
            xgr.apply_token_bitmask_inplace(row, bm)
            times.append(time.perf_counter() - t0)
            t = int(row.argmax())
            if m.is_terminated() or t == tok.eos_token_id:
                break
            m.accept_token(t)
        return times

    return compile_, walk


def main() -> None:
    torch.set_num_threads(1)
    from bench.serving_features import _base
    from workers.base_model import load_tokenizer
    from workers.serving.grammar import GrammarCache

    base_dir, model_name = _base(Path(tempfile.mkdtemp(prefix="lorafleet-bench-grammar-")))
    tok = load_tokenizer(base_dir)
    libs = {"llguidance": _llguidance(tok)}
    xgr = _xgrammar(tok)
    if xgr is not None:
        libs["xgrammar"] = xgr
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(len(tok), generator=g) for _ in range(STEPS)]
    compile_s: dict[str, list[float]] = {k: [] for k in libs}
    mask_s: dict[str, list[float]] = {k: [] for k in libs}
    k = 0
    for _ in range(ROUNDS):
        for name, (compile_, walk) in libs.items():
            k += 1
            t0 = time.perf_counter()
            matcher = compile_(k)
            compile_s[name].append(time.perf_counter() - t0)
            mask_s[name].append(statistics.median(walk(matcher, logits)))
    cache = GrammarCache(tok)
    rng = random.Random(0)
    weights = [2.0**-i for i in range(8)]
    for _ in range(400):
        cache.compile(_schema(100 + rng.choices(range(8), weights)[0]))
    result: dict[str, Any] = {
        "model": model_name, "environment": environment(1), "rounds": ROUNDS,
        "compile_ms_p50": {n: median(v) * 1e3 for n, v in compile_s.items()},
        "mask_us_p50": {n: median(v) * 1e6 for n, v in mask_s.items()},
        "cache": {"requests": 400, "distinct": 8, "hit_rate": cache.hit_rate},
    }  # fmt: skip
    if "xgrammar" in libs:
        result["xgrammar_over_llguidance"] = {
            "compile": median([x / y for x, y in zip(compile_s["xgrammar"],
                                                     compile_s["llguidance"], strict=True)]),
            "mask": median([x / y for x, y in zip(mask_s["xgrammar"], mask_s["llguidance"],
                                                  strict=True)]),
        }  # fmt: skip
    path = write_result("grammar", result)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    print(f"→ {path}")


if __name__ == "__main__":
    main()
