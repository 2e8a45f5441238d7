"""The serving engine on a GPU: one prepared run, for a session that is lent one.

Correctness (float32, TF32 off; a 8-layer Llama with GQA, 8 LoRA adapters on every linear):
- mixed batches: 24 rows over 8 adapters and the base, greedy, decoded together by the
  engine's step decoder, against PEFT's ``generate`` for each adapter alone: token equality;
- log-probabilities: every sampled token's and every prompt token's (echo), against PEFT's
  forward log-softmax: the largest difference.

Speed (bfloat16; a ~1.1B Llama: hidden 2048, 16 layers, 16 heads / 8 KV heads, vocab 32,000),
paired rounds (A B A B …), median ratio with its min–max:
- 64 rows over 16 adapters vs PEFT's mixed-batch ``generate(adapter_names=…)``, tokens/s;
- prefix cache: time to first token of a prompt with a shared 1,000-token prefix, warm / cold;
- ``n = 8`` rows sharing one prefill vs 8 separate requests (512-token prompt, 64 new tokens);
- ``logprobs = 5`` on vs off, 32 rows × 64 tokens, tokens/s.

    python bench/gpu_serving.py --out gpu_serving.json [--smoke]

``--smoke`` runs every part at toy sizes on the CPU (to check the script, not to measure).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter
from workers.serving.decode import DecodeRow, choice_seed
from workers.serving.multi_lora import to_multi_lora
from workers.serving.prefix_cache import PrefixCache, prefix_root
from workers.serving.stepper import StepDecoder
from workers.tiny_base import train_tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUNDS = 5


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-round a/b: median, min, max."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": _median(r), "min": min(r), "max": max(r)}


def _model(dims: dict[str, int], dtype: torch.dtype, device: str, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, initializer_range=dims["hidden"] ** -0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _adapters(model: Any, n: int, r: int, work: Path) -> list[Path]:
    """``n`` PEFT-format adapters of rank ``r`` on every linear layer (random B, as trained)."""
    out = []
    for i in range(n):
        m = copy.deepcopy(model)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS)
        inject_lora(m, cfg)
        with torch.no_grad():
            for layer in lora_modules(m).values():
                layer.lora_B.weight.normal_(0, 0.02)
        out.append(save_adapter(m, cfg, work / f"ad{i}"))
        del m
    return out


def _slotted(model: Any, dirs: list[Path], r: int) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` with multi-LoRA slots holding ``dirs`` (slot i = adapter i)."""
    from safetensors.torch import load_file

    from workers.lora.io import parse_adapter_keys, read_adapter_config

    ours = copy.deepcopy(model)
    paths = [n for n, mod in ours.named_modules() if n.endswith(TARGETS)]
    layers = to_multi_lora(ours, paths, n_slots=len(dirs), max_rank=r)
    dev = next(ours.parameters()).device
    for i, d in enumerate(dirs):
        pairs = parse_adapter_keys(load_file(str(d / "adapter_model.safetensors")))
        scaling = read_adapter_config(d).scaling
        for path, pair in pairs.items():
            layers[path].load_slot(i, pair["A"].to(dev), pair["B"].to(dev), scaling)
    return ours, layers


def _peft(model: Any, dirs: list[Path]) -> Any:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        peft_model.load_adapter(str(d), adapter_name=f"a{i}")
    return peft_model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _run(decoder: StepDecoder) -> None:
    while not decoder.idle:
        decoder.step()


def correctness(device: str, dims: dict[str, int], tok: Any, work: Path) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _model(dims, torch.float32, device, tok)
    dirs = _adapters(model, 8, 16, work / "fp32")
    ours, layers = _slotted(model, dirs, 16)
    peft_model = _peft(model, dirs)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 500, (int(torch.randint(12, 40, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(24)]  # fmt: skip
    slots = [i % 9 - 1 for i in range(24)]  # -1: the base
    rows = [DecodeRow(p, slot=s, max_new_tokens=12, min_new_tokens=12, logprobs=5,
                      prompt_logprobs=5, deltas=False)
            for p, s in zip(prompts, slots, strict=True)]  # fmt: skip
    decoder = StepDecoder(ours, tok, layers, max_rows=24, kv_tokens=24 * 64)
    seqs = [decoder.add(r) for r in rows]
    _run(decoder)
    equal, max_diff = 0, 0.0
    for p, s, seq in zip(prompts, slots, seqs, strict=True):
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            if s < 0:
                with peft_model.disable_adapter():
                    gen = peft_model.generate(
                        input_ids=ids,
                        max_new_tokens=12,
                        min_new_tokens=12,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )
                    full = peft_model(input_ids=gen).logits[0].float()
            else:
                peft_model.set_adapter(f"a{s}")
                gen = peft_model.generate(
                    input_ids=ids,
                    max_new_tokens=12,
                    min_new_tokens=12,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                full = peft_model(input_ids=gen).logits[0].float()
        expected = gen[0, len(p) :].tolist()
        equal += int(expected == seq.out.token_ids)
        logp = torch.log_softmax(full, dim=-1)
        for i, e in enumerate(seq.out.logprobs):
            max_diff = max(max_diff, abs(e.logprob - float(logp[len(p) - 1 + i, e.token])))
        for q, e in enumerate(seq.out.prompt_logprobs[1:], start=1):
            assert e is not None
            max_diff = max(max_diff, abs(e.logprob - float(logp[q - 1, e.token])))
    torch.backends.cuda.matmul.allow_tf32 = True
    return {"rows": len(rows), "adapters": 8, "rows_equal_to_peft": equal,
            "max_abs_logprob_diff": max_diff, "dtype": "float32"}  # fmt: skip


def speed(device: str, dims: dict[str, int], tok: Any, work: Path, sizes: dict[str, int]
          ) -> dict[str, Any]:  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(dims, dtype, device, tok)
    dirs = _adapters(model, 16, 16, work / "bf16")
    ours, layers = _slotted(model, dirs, 16)
    out: dict[str, Any] = {
        "dtype": str(dtype),
        "params": sum(p.numel() for p in model.parameters()),
    }
    g = torch.Generator().manual_seed(2)

    def rand(n: int) -> list[int]:
        return torch.randint(5, 500, (n,), generator=g).tolist()

    # -- 64 rows over 16 adapters vs PEFT --------------------------------------------------
    held = {"peft": _peft(model, dirs)}  # dropped after its part: one PEFT copy at a time
    batch, new = sizes["batch"], sizes["new"]
    prompts = [rand(24) for _ in range(batch)]

    def ours_mixed() -> float:
        rows = [DecodeRow(p, slot=i % 16, max_new_tokens=new, min_new_tokens=new, deltas=False)
                for i, p in enumerate(prompts)]  # fmt: skip
        decoder = StepDecoder(ours, tok, layers, max_rows=batch, kv_tokens=batch * 64)
        for r in rows:
            decoder.add(r)
        _sync(device)
        t0 = time.perf_counter()
        _run(decoder)
        _sync(device)
        return time.perf_counter() - t0

    def peft_mixed() -> float:
        ids = torch.tensor(prompts, device=device)
        names = [f"a{i % 16}" for i in range(batch)]
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            held["peft"].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                adapter_names=names, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        _sync(device)
        return time.perf_counter() - t0

    ours_mixed(), peft_mixed()
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(ours_mixed())
        b.append(peft_mixed())
    tokens = batch * new
    out["mixed_64x16"] = {"ours_tokens_per_s": tokens / _median(a),
                          "peft_tokens_per_s": tokens / _median(b),
                          "ours_vs_peft": _ratio(b, a)}  # fmt: skip
    held.clear()

    # -- prefix cache: TTFT warm / cold ----------------------------------------------------
    shared = rand(sizes["prefix"])
    root = prefix_root("bench", None, None)

    def ttft(cache: PrefixCache) -> float:
        decoder = StepDecoder(ours, tok, layers, max_rows=4, kv_tokens=1 << 16,
                              prefix_cache=cache)  # fmt: skip
        prompt = shared + rand(16)
        seq = decoder.create(DecodeRow(prompt, max_new_tokens=4, deltas=False))
        _sync(device)
        t0 = time.perf_counter()
        n, kv = cache.take(root, prompt)
        decoder.admit([seq], reuse=n, prefix=kv, cache_key=("", root))
        while not seq.out.token_ids and not seq.done:
            decoder.step()
        _sync(device)
        dt = time.perf_counter() - t0
        _run(decoder)
        return dt

    warm_cache = PrefixCache()
    ttft(warm_cache)  # fills it (and warms up)
    cold, warm = [], []
    for _ in range(ROUNDS):
        cold.append(ttft(PrefixCache()))
        warm.append(ttft(warm_cache))
    out["prefix_cache_ttft"] = {
        "prefix_tokens": len(shared),
        "cold_s": _median(cold),
        "warm_s": _median(warm),
        "warm_vs_cold": _ratio(warm, cold),
    }

    # -- n = 8 sharing one prefill vs 8 separate requests ------------------------------------
    prompt = rand(sizes["n_prompt"])

    def n_rows(shared_prefill: bool) -> float:
        decoder = StepDecoder(ours, tok, layers, max_rows=8, kv_tokens=1 << 16)
        rows = [DecodeRow(prompt, slot=3, max_new_tokens=new, min_new_tokens=new,
                          temperature=1.0, seed=choice_seed(7, 0, j), deltas=False)
                for j in range(8)]  # fmt: skip
        seqs = [decoder.create(r) for r in rows]
        _sync(device)
        t0 = time.perf_counter()
        if shared_prefill:
            decoder.admit(seqs)
        else:
            for s in seqs:
                decoder.admit([s])
        _run(decoder)
        _sync(device)
        return time.perf_counter() - t0

    n_rows(True), n_rows(False)
    one, separate = [], []
    for _ in range(ROUNDS):
        one.append(n_rows(True))
        separate.append(n_rows(False))
    out["n8"] = {"prompt_tokens": len(prompt), "new_tokens": new,
                 "tokens_per_s_one_request": 8 * new / _median(one),
                 "tokens_per_s_separate": 8 * new / _median(separate),
                 "one_vs_separate": _ratio(separate, one)}  # fmt: skip

    # -- logprobs on vs off ----------------------------------------------------------------
    lp_prompts = [rand(32) for _ in range(32)]

    def with_logprobs(k: int | None) -> float:
        decoder = StepDecoder(ours, tok, layers, max_rows=32, kv_tokens=32 * 128)
        for i, p in enumerate(lp_prompts):
            decoder.add(DecodeRow(p, slot=i % 16, max_new_tokens=new, min_new_tokens=new,
                                  logprobs=k, deltas=False))  # fmt: skip
        _sync(device)
        t0 = time.perf_counter()
        _run(decoder)
        _sync(device)
        return time.perf_counter() - t0

    with_logprobs(5), with_logprobs(None)
    on, off = [], []
    for _ in range(ROUNDS):
        on.append(with_logprobs(5))
        off.append(with_logprobs(None))
    out["logprobs5"] = {"rows": 32, "vocab": dims["vocab"],
                        "on_vs_off_tokens_per_s": _ratio(off, on)}  # fmt: skip
    return out


def main() -> None:
    smoke = "--smoke" in sys.argv
    out_path = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    tok = train_tokenizer(512)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-gpu-"))
    if smoke:
        small = {"vocab": 1024, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4,
                 "kv_heads": 2}  # fmt: skip
        check, big = small, small
        sizes = {"batch": 8, "new": 4, "prefix": 64, "n_prompt": 32}
    else:
        check = {"vocab": 32000, "hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16,
                 "kv_heads": 4}  # fmt: skip
        big = {"vocab": 32000, "hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16,
               "kv_heads": 8}  # fmt: skip
        sizes = {"batch": 64, "new": 64, "prefix": 1000, "n_prompt": 512}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else
                              "cpu", "torch": torch.__version__, "smoke": smoke}  # fmt: skip
    t0 = time.perf_counter()

    def save() -> None:
        text = json.dumps(result, indent=2, sort_keys=True)
        print(text, flush=True)
        if out_path is not None:
            out_path.write_text(text + "\n")

    for name, part in (("correctness", lambda: correctness(device, check, tok, work)),
                       ("speed", lambda: speed(device, big, tok, work, sizes))):  # fmt: skip
        try:
            result[name] = part()
        except Exception as exc:  # one part failing must not lose the others' figures
            traceback.print_exc()
            result[name] = {"error": repr(exc)}
        result["seconds"] = time.perf_counter() - t0
        save()


if __name__ == "__main__":
    main()
