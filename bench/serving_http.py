"""The HTTP path: the same request mix fed to the engine directly and through HTTP + Ray Serve.

The tiny base with 16 adapters, as ``lorafleet serve`` runs it (one replica, the Ray Serve app
on a local Ray). A mix of ``REQUESTS`` completions over the 16 adapters and the base, prompts
of a few words, ``max_tokens`` 16–64, greedy, all offered at once (saturation), is answered:

- by the engine alone (``ServingEngine.submit`` from threads, no HTTP, no Ray);
- through HTTP + Ray Serve, not streamed;
- through HTTP + Ray Serve, streamed (server-sent events).

Each is timed from the first request sent to the last answer, in paired rounds (engine, HTTP,
streamed, engine, …); reported: requests/s and tokens/s (tokens as the ``usage`` fields count
them), and each HTTP rate / the engine's in the same round (median, min–max).

    python bench/serving_http.py [--rounds 5] [--requests 256]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ADAPTERS = 16
ADMIN = "bench-admin-token-0123456789"
CONCURRENCY = 128  # clients at once through HTTP (Serve queues the rest)


def _arg(name: str, default: int) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def _mix(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(f"spell {rng.randrange(10)}" for _ in range(rng.randrange(1, 6)))
        a = rng.randrange(-1, ADAPTERS)
        out.append({"model": "tiny" if a < 0 else f"bench/a{a:02d}", "prompt": words + " =",
                    "max_tokens": rng.randint(16, 64), "temperature": 0})  # fmt: skip
    return out


def _setup(work: Path) -> tuple[Any, Any, Path]:
    import torch

    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.base_model import load_base
    from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter
    from workers.tiny_base import create_tiny_base

    base_dir = create_tiny_base(work / "base")
    settings = load_settings({"LORAFLEET_HOME": str(work / "home"),
                              "LORAFLEET_API_TOKEN": ADMIN})  # fmt: skip
    registry = Registry.from_settings(settings)
    registry.register_base(name="tiny", path=base_dir)
    for i in range(ADAPTERS):
        model, _ = load_base(base_dir)
        torch.manual_seed(i)
        cfg = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
        inject_lora(model, cfg)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.weight.normal_(0, 0.05)
        registry.publish(adapter_dir=save_adapter(model, cfg, work / f"a{i}"),
                         ref=f"bench/a{i:02d}", base_model="tiny")  # fmt: skip
    return settings, registry, base_dir


def engine_run(engine: Any, mix: list[dict[str, Any]]) -> dict[str, float]:
    """Every request submitted at once from this thread; the answers counted as they come."""
    from workers.serving.engine import GenRequest

    left = threading.Semaphore(0)
    tokens = [0]
    lock = threading.Lock()

    def done(results: Any) -> None:
        with lock:
            tokens[0] += sum(r.completion_tokens for r in results if r.error is None)
        left.release()

    t0 = time.perf_counter()
    for body in mix:
        adapter = None if body["model"] == "tiny" else body["model"]
        engine.submit(GenRequest(body["prompt"], adapter, body["max_tokens"], 0.0), done)
    for _ in mix:
        left.acquire()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "requests_per_s": len(mix) / dt, "tokens_per_s": tokens[0] / dt}


async def _http(url: str, mix: list[dict[str, Any]], stream: bool) -> dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    sem = asyncio.Semaphore(CONCURRENCY)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    tokens, errors = 0, 0

    async def one(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal tokens, errors
        async with sem:
            if not stream:
                r = await http.post("/v1/completions", json=body, headers=headers)
                if r.status_code != 200:
                    errors += 1
                    print(r.status_code, r.text[:200], flush=True)
                    return
                tokens += r.json()["usage"]["completion_tokens"]
                return
            payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/completions", json=payload,
                                   headers=headers) as r:  # fmt: skip
                if r.status_code != 200:
                    errors += 1
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http, b) for b in mix))
        dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{errors} requests failed")
    return {"seconds": dt, "requests_per_s": len(mix) / dt, "tokens_per_s": tokens / dt}


def main() -> None:
    import ray
    import torch

    from storage.settings import settings_for_nodes
    from workers.serving.deployments import ServeOptions, start, stop
    from workers.serving.engine import ServingEngine

    torch.set_num_threads(1)
    os.environ["LORAFLEET_API_TOKEN"] = ADMIN  # each node reads it from its own environment
    rounds, n = _arg("--rounds", 5), _arg("--requests", 256)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-http-"))
    settings, registry, _ = _setup(work)
    opts = ServeOptions(base_name="tiny", settings_json=settings_for_nodes(settings), slots=16,
                        max_rank=8, num_cpus=1, max_batch_size=32)  # fmt: skip
    engine = ServingEngine(registry.base_dir("tiny"), registry, slots=opts.slots,
                           max_rank=opts.max_rank, max_rows=opts.max_batch_size)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    url = start(opts, port=18000 + random.randrange(1000), quiet=True)
    try:
        warm = _mix(64, 0)
        engine_run(engine, warm)
        asyncio.run(_http(url, warm, False))
        asyncio.run(_http(url, warm, True))
        runs: list[dict[str, Any]] = []
        for r in range(rounds):
            mix = _mix(n, 1 + r)
            row = {"engine": engine_run(engine, mix),
                   "http": asyncio.run(_http(url, mix, False)),
                   "http_stream": asyncio.run(_http(url, mix, True))}  # fmt: skip
            runs.append(row)
            print(f"round {r}: " + ", ".join(f"{k} {v['requests_per_s']:.1f} req/s "
                                             f"{v['tokens_per_s']:.0f} tok/s"
                                             for k, v in row.items()), flush=True)  # fmt: skip
    finally:
        engine.close()
        stop()
        ray.shutdown()
    out: dict[str, Any] = {"requests": n, "rounds": runs, "adapters": ADAPTERS,
                           "concurrency": CONCURRENCY, "rows": opts.max_batch_size}  # fmt: skip
    for kind in ("http", "http_stream"):
        ratios = [x[kind]["tokens_per_s"] / x["engine"]["tokens_per_s"] for x in runs]
        out[f"{kind}_vs_engine"] = {"median": median(ratios), "min": min(ratios),
                                    "max": max(ratios)}  # fmt: skip
        out[f"{kind}_requests_per_s"] = median([x[kind]["requests_per_s"] for x in runs])
        out[f"{kind}_tokens_per_s"] = median([x[kind]["tokens_per_s"] for x in runs])
    out["engine_requests_per_s"] = median([x["engine"]["requests_per_s"] for x in runs])
    out["engine_tokens_per_s"] = median([x["engine"]["tokens_per_s"] for x in runs])
    out["environment"] = environment(threads=1)
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=2))
    if "--no-write" not in sys.argv:
        print(f"wrote {write_result('serving_http', out)}")


if __name__ == "__main__":
    main()
