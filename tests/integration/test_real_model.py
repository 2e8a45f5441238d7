"""A real pretrained chat model, end to end without Ray: SmolLM2-135M-Instruct (a Llama with
tied embeddings, a real BPE tokenizer, its own chat template and ``<|im_end|>`` EOS).

Registered into the object store, a LoRA adapter trained on chat rows with the model's own
template, published, and served by the engine in one mixed batch (adapter and base rows) —
the answers equal PEFT's greedy ``generate`` token for token. Tiny seeded models would hide
what a real tokenizer and template do.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from storage.registry import Registry
from storage.settings import load_settings

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Name a primary colour."}],
]  # fmt: skip


def test_real_chat_model_trains_and_serves_equal_to_peft(smollm_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from workers.base_model import load_base
    from workers.lora import LoraConfig
    from workers.serving.engine import GenRequest, ServingEngine
    from workers.serving.openai_api import ChatMessage, chat_prompt_ids
    from workers.training.recipe import TrainConfig
    from workers.training.single import train_single

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    base = registry.register_base(name="smollm2-135m", path=smollm_dir)
    assert any(f.name == "chat_template.jinja" for f in base.files)  # the template travels too
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": f"The number is {i}."}]}
            for i in range(16)]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = train_single(
        base_dir=smollm_dir, data_path=data, out_dir=tmp_path / "adapter",
        lora=LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=4, batch_size=2, seq_len=64, eval_every=0, warmup_steps=1,
                          lr=1e-3),
    )  # fmt: skip
    assert trained.result.eval_loss_final < trained.result.eval_loss_initial
    version = registry.publish(adapter_dir=trained.adapter_dir, ref="team/smol-chat",
                               base_model="smollm2-135m")  # fmt: skip

    engine = ServingEngine(registry.base_dir("smollm2-135m"), registry, slots=2, max_rank=8)
    tok = engine.tokenizer
    assert tok.eos_token == "<|im_end|>"
    prompts = [chat_prompt_ids(tok, [ChatMessage(**m) for m in chat]) for chat in CHATS]
    requests = [GenRequest(p, adapter=a, max_tokens=12)
                for p in prompts for a in (version.ref, None)]  # fmt: skip
    # continuous batching: each request joins while the ones before it are mid-answer
    served: list[Any] = [None] * len(requests)
    finished = threading.Semaphore(0)
    for i, req in enumerate(requests):
        first_text = threading.Event()

        def done(results: Any, i: int = i, started: threading.Event = first_text) -> None:
            served[i] = results[0]
            started.set()
            finished.release()

        engine.submit(req, done, lambda *_, e=first_text: e.set())
        assert first_text.wait(60)  # this one is decoding (or done); the next joins its batch
    for _ in requests:
        assert finished.acquire(timeout=120)
    assert all(r.error is None for r in served), [r.error for r in served]
    assert engine.stats()["batches"]["max_rows"] >= 2  # they did share forward passes
    engine.close()

    model, _ = load_base(smollm_dir)
    peft_model = PeftModel.from_pretrained(model, str(trained.adapter_dir))
    peft_model.eval()
    for req, got in zip(requests, served, strict=True):
        ids = torch.tensor([list(req.prompt)])
        with torch.no_grad():
            if req.adapter is None:
                with peft_model.disable_adapter():
                    out = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                                              eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id)  # fmt: skip
            else:
                out = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                                          eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)  # fmt: skip
        expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert got.text == expected, (req.adapter, got.text, expected)
    # the adapter really changes the answer of at least one conversation
    assert [r.text for r in served[0::2]] != [r.text for r in served[1::2]]
