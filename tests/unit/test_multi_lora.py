"""A mixed batch over adapter slots gives every row exactly what it gets alone."""

from __future__ import annotations

import torch

from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, lora_modules
from workers.serving.multi_lora import BASE_SLOT, set_batch_slots, to_multi_lora

PATHS_TARGETS = ("q_proj", "v_proj")


def _adapter(tiny_base_dir, r, seed):  # type: ignore[no-untyped-def]
    model, tok = load_base(tiny_base_dir)
    torch.manual_seed(seed)
    inject_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=PATHS_TARGETS))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    return model, tok


def test_mixed_batch_equals_each_row_alone(tiny_base_dir):
    adapters = [_adapter(tiny_base_dir, r, seed) for r, seed in ((4, 1), (8, 2), (2, 3))]
    tok = adapters[0][1]
    base, _ = load_base(tiny_base_dir)
    paths = list(lora_modules(adapters[0][0]))
    layers = to_multi_lora(base, paths, n_slots=4, max_rank=8)
    for slot, (model, _) in enumerate(adapters):
        for path, lora in lora_modules(model).items():
            layers[path].load_slot(slot, lora.lora_A.weight, lora.lora_B.weight, lora.scaling)

    prompts = ["spell 1 2 3 =", "spell 9 =", "hello there", "spell 4 4 ="]
    slots = [0, 1, BASE_SLOT, 2]  # three adapters and the bare base in one batch
    enc = tok(prompts, return_tensors="pt", padding=True)
    set_batch_slots(layers, torch.tensor(slots))
    with torch.no_grad():
        mixed = base(**enc).logits
    plain, _ = load_base(tiny_base_dir)
    for row, slot in enumerate(slots):
        single = {k: v[row : row + 1] for k, v in enc.items()}
        reference = plain if slot == BASE_SLOT else adapters[slot][0]
        with torch.no_grad():
            alone = reference(**single).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)

    set_batch_slots(layers, None)  # no slots: exactly the base
    with torch.no_grad():
        torch.testing.assert_close(base(**enc).logits, plain(**enc).logits, atol=0, rtol=0)


def test_mixed_generation_equals_each_adapter_alone_and_peft(tiny_base_dir, tmp_path):
    """Greedy decoding of a mixed batch equals PEFT's generate for each adapter, token for token."""
    from peft import PeftModel

    from workers.generate import greedy_generate
    from workers.lora import save_adapter
    from workers.serving.generate import generate_mixed

    adapters = []
    for i, (r, seed) in enumerate(((4, 1), (8, 2))):
        model, _ = _adapter(tiny_base_dir, r, seed)
        save_adapter(
            model, LoraConfig(r=r, alpha=2 * r, target_modules=PATHS_TARGETS), tmp_path / f"ad{i}"
        )
        adapters.append(model)
    base, tok = load_base(tiny_base_dir)
    layers = to_multi_lora(base, list(lora_modules(adapters[0])), n_slots=2, max_rank=8)
    for slot, model in enumerate(adapters):
        for path, lora in lora_modules(model).items():
            layers[path].load_slot(slot, lora.lora_A.weight, lora.lora_B.weight, lora.scaling)
    prompts = ["spell 1 2 =", "spell 7 =", "hello", "spell 3 3 3 ="]
    slots = [0, 1, BASE_SLOT, 1]
    mixed = generate_mixed(base, tok, layers, prompts, slots, max_new_tokens=8)
    for prompt, slot, text in zip(prompts, slots, mixed, strict=True):
        plain, _ = load_base(tiny_base_dir)
        if slot == BASE_SLOT:
            expected = greedy_generate(plain, tok, [prompt], max_new_tokens=8)[0]
        else:
            peft_model = PeftModel.from_pretrained(plain, tmp_path / f"ad{slot}")
            expected = greedy_generate(peft_model, tok, [prompt], max_new_tokens=8)[0]
        assert text == expected, (prompt, slot)
