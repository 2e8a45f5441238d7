"""The Tinker-compatible API: its cost over the training core, sessions sharing a base, and
what a session's adapter equals.

The tiny base (a 2-layer Llama, hidden 128), LoRA r=8 on attention and MLP, one thread for
torch; ``lorafleet server`` in its own process on loopback, driven by the unmodified ``tinker``
SDK. Three measurements, each over paired rounds (A B A B …, 7 rounds):

- ``sdk_over_in_process``: one ``forward_backward`` + ``optim_step`` through the SDK (HTTP,
  protobuf, futures, the session worker) vs the same step on a ``SessionHost`` called in
  process, 8 datums of 64 tokens. Goal (issue 28): ≤ 1.3×.
- ``concurrent_over_solo``: 4 sessions stepping at once (one SDK client each, in 4 threads),
  each session's tokens/s over one session stepping alone; the figure is the slowest
  session's per round. Goal: ≥ 0.8×.
- ``max_abs_diff_vs_train``: a session's adapter after 6 steps against the training recipe
  (what ``lorafleet train`` runs) on the same batches, same seed, same AdamW settings
  (constant lr, clipping at 1.0): the largest difference of any LoRA weight. Goal: ≤ 1e-5.

Writes ``bench/results/tinker_api.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ROUNDS, STEPS, DATUMS, TOKENS, SESSIONS, RANK = 7, 3, 8, 64, 4, 8
EQUAL_STEPS = 6


def _datums(k: int, n: int = DATUMS) -> list[Any]:
    from tinker import types

    g = np.random.default_rng(k)
    out = []
    for _ in range(n):
        ids = g.integers(3, 500, TOKENS + 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(TOKENS, np.float32)},
            )
        )
    return out


def _as_calls(key: str, data: list[Any]) -> Any:
    from workers.training.objectives import TokenDatum
    from workers.training.sessions import LossCall

    return LossCall(key, [TokenDatum(tuple(d.model_input.to_ints()),
                                     tuple(int(t) for t in d.loss_fn_inputs["target_tokens"].data),
                                     {"weights": tuple(d.loss_fn_inputs["weights"].data)})
                          for d in data])  # fmt: skip


def _ratio(a: list[float], b: list[float]) -> dict[str, float]:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": median(r), "min": min(r), "max": max(r)}


def main() -> None:
    os.environ["TINKER_TELEMETRY"] = "0"
    torch.set_num_threads(1)
    import tinker
    from tinker import types

    from storage.catalog import repository as repo
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.base_model import load_base
    from workers.tiny_base import TinySpec, create_tiny_base
    from workers.training.sessions import Adam, SessionHost, session_lora

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-tinker-"))
    base_dir = create_tiny_base(work / "tiny", TinySpec())
    settings = load_settings({"LORAFLEET_HOME": str(work / "home"),
                              "LORAFLEET_API_TOKEN": "bench-admin-token-0123456789"})  # fmt: skip
    registry = Registry.from_settings(settings)
    registry.catalog.upgrade()
    registry.register_base(name="tiny", path=base_dir)
    key = "tml-" + repo.create_token(registry.catalog, namespace="bench", name="t")
    server = _server(work)  # its own process, as users run it
    sc = tinker.ServiceClient(base_url=server.url, api_key=key)
    adam = types.AdamParams(learning_rate=1e-3)

    # 1. one step through the SDK vs the same step in process
    model, tok = load_base(base_dir)
    local = SessionHost(model, tok)
    local.create("local", session_lora(RANK), seed=0)
    data = _datums(0)
    call = _as_calls("local", data)
    client = sc.create_lora_training_client(base_model="tiny", rank=RANK, seed=0).result()

    def in_process() -> None:
        local.forward_backward([call])
        local.optim_step("local", Adam(learning_rate=1e-3))

    def through_sdk() -> None:
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam)
        fb.result()
        opt.result()

    in_process(), through_sdk()  # warm-up
    times: dict[str, list[float]] = {"in_process": [], "sdk": []}
    for _ in range(ROUNDS):
        for name, fn in (("in_process", in_process), ("sdk", through_sdk)):
            t0 = time.perf_counter()
            for _ in range(STEPS):
                fn()
            times[name].append((time.perf_counter() - t0) / STEPS)

    # 2. four sessions at once vs one alone (tokens/s of each session)
    clients = [sc.create_lora_training_client(base_model="tiny", rank=RANK, seed=k).result()
               for k in range(SESSIONS)]  # fmt: skip
    per = [_datums(10 + k) for k in range(SESSIONS)]

    def run(c: Any, d: list[Any], out: list[float], i: int) -> None:
        t0 = time.perf_counter()
        for _ in range(STEPS):
            fb = c.forward_backward(d, "cross_entropy")
            opt = c.optim_step(adam)
            fb.result()
            opt.result()
        out[i] = STEPS * DATUMS * TOKENS / (time.perf_counter() - t0)

    def solo() -> float:
        out = [0.0]
        run(clients[0], per[0], out, 0)
        return out[0]

    def together() -> list[float]:
        out = [0.0] * SESSIONS
        threads = [threading.Thread(target=run, args=(c, d, out, i))
                   for i, (c, d) in enumerate(zip(clients, per, strict=True))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    solo(), together()  # warm-up
    solo_rates: list[float] = []
    slowest: list[float] = []
    for _ in range(ROUNDS):
        solo_rates.append(solo())
        slowest.append(min(together()))

    # 3. a session's adapter vs the training recipe on the same batches
    diff = _equality(sc, registry, base_dir)
    server.stop()

    result = {
        "base": "tiny (2 layers, hidden 128)",
        "environment": environment(1),
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
        "datums_per_step": DATUMS,
        "tokens_per_datum": TOKENS,
        "step_s": {k: median(v) for k, v in times.items()},
        "sdk_over_in_process": _ratio(times["sdk"], times["in_process"]),
        "solo_tokens_per_s": median(solo_rates),
        "concurrent_sessions": SESSIONS,
        "concurrent_over_solo": _ratio(slowest, solo_rates),
        "equality_steps": EQUAL_STEPS,
        "max_abs_diff_vs_train": diff,
    }
    path = write_result("tinker_api", result)
    for k in ("sdk_over_in_process", "concurrent_over_solo"):
        r = result[k]
        print(f"{k}: {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})")
    print(f"max |session − lorafleet train| after {EQUAL_STEPS} steps: {diff:.2e} → {path}")


class _Server:
    def __init__(self, work: Path) -> None:
        import subprocess

        import httpx

        from infra.servers import free_port, wait_until

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LORAFLEET_HOME": str(work / "home"), "OMP_NUM_THREADS": "1",
               "LORAFLEET_API_TOKEN": "bench-admin-token-0123456789"}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "server",
                                      "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s=120, what="lorafleet server")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _server(work: Path) -> _Server:
    return _Server(work)


def _equality(sc: Any, registry: Any, base_dir: Path) -> float:
    """The largest LoRA-weight difference between a session and the recipe after the same
    steps (the session weights each token 1/tokens: the recipe's mean per token)."""
    from safetensors.torch import load_file
    from tinker import types

    from workers.base_model import load_base
    from workers.datasets import IGNORE_INDEX, Example
    from workers.lora import LoraConfig
    from workers.training.batches import global_batch_indices
    from workers.training.checkpoint import adapter_state
    from workers.training.recipe import LoraFinetuneRecipe
    from workers.training.sessions import ATTN_MODULES, MLP_MODULES, SESSION_ALPHA
    from workers.training.settings import TrainConfig

    g = np.random.default_rng(7)
    items = []
    for _ in range(16):
        ids = g.integers(3, 500, int(g.integers(20, 48))).tolist()
        cut = len(ids) // 3  # a prompt the loss ignores, as in SFT rows
        items.append(Example(tuple(ids), tuple([IGNORE_INDEX] * cut + ids[cut:])))
    cfg = TrainConfig(max_steps=EQUAL_STEPS, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0,
                      batch_size=4, seed=5, eval_every=0, max_grad_norm=1.0)  # fmt: skip
    model, tok = load_base(base_dir)
    lora = LoraConfig(r=RANK, alpha=SESSION_ALPHA, target_modules=ATTN_MODULES + MLP_MODULES)
    recipe = LoraFinetuneRecipe(model, lora, cfg, pad_id=tok.pad_token_id)
    recipe.setup()
    recipe.train(items)
    tc = sc.create_lora_training_client(base_model="tiny", rank=RANK, seed=cfg.seed).result()
    adam = types.AdamParams(
        learning_rate=cfg.lr,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.max_grad_norm,
    )
    for step in range(EQUAL_STEPS):
        batch = [
            items[i]
            for i in global_batch_indices(
                step, n_examples=len(items), seed=cfg.seed, global_batch=4
            )
        ]
        n = sum(1 for e in batch for t in e.labels[1:] if t != IGNORE_INDEX)
        data = [types.Datum(model_input=types.ModelInput.from_ints(list(e.input_ids[:-1])),
                            loss_fn_inputs={
                                "target_tokens": np.asarray(e.input_ids[1:], np.int64),
                                "weights": np.asarray([1.0 / n if t != IGNORE_INDEX else 0.0
                                                       for t in e.labels[1:]], np.float32)})
                for e in batch]  # fmt: skip
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)
        fb.result()
        opt.result()
    # the session's weights as any node gets them: published to the catalog, fetched, verified
    tc.save_weights_for_sampler("equal").result()
    version = next(
        v
        for v in registry.list(namespace="bench")
        if v.hyperparameters.get("tinker", {}).get("model_id") == tc.model_id
    )
    _, adapter_dir = registry.fetch(version)
    session = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    ours = adapter_state(recipe.member.modules)  # type: ignore[union-attr]
    return max(float((session[k] - ours[k]).abs().max()) for k in ours)


if __name__ == "__main__":
    main()
