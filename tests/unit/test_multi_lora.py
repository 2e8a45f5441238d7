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


def test_dora_rows_share_a_batch_with_lora_and_base_rows(tiny_base_dir, tmp_path):
    """A PEFT DoRA adapter, a LoRA adapter and the bare base in one batch: every row's logits
    are PEFT's for that row alone."""
    from peft import PeftModel

    from tests.peft_dora import peft_dora_adapter
    from workers.lora.io import parse_adapter_keys, read_adapter_weights

    peft_dora_adapter(tiny_base_dir, tmp_path / "dora", list(PATHS_TARGETS), seed=4, scale=0.3)
    lora_model, tok = _adapter(tiny_base_dir, 8, 2)
    base, _ = load_base(tiny_base_dir)
    layers = to_multi_lora(base, list(lora_modules(lora_model)), n_slots=3, max_rank=8)
    dora = parse_adapter_keys(read_adapter_weights(tmp_path / "dora"))
    for path, layer in layers.items():
        layer.load_slot(0, dora[path]["A"], dora[path]["B"], 2.0, magnitude=dora[path]["M"])
        lora = lora_modules(lora_model)[path]
        layer.load_slot(1, lora.lora_A.weight, lora.lora_B.weight, lora.scaling)
    prompts = ["spell 1 2 3 =", "spell 9 =", "hello there", "spell 4 4 ="]
    slots = [0, 1, BASE_SLOT, 0]
    enc = tok(prompts, return_tensors="pt", padding=True)
    set_batch_slots(layers, torch.tensor(slots))
    assert all(layer.scale_rows for layer in layers.values())
    with torch.no_grad():
        mixed = base(**enc).logits
    peft_loaded = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "dora")
    references = {0: peft_loaded.eval(), 1: lora_model, BASE_SLOT: load_base(tiny_base_dir)[0]}
    for row, slot in enumerate(slots):
        single = {k: v[row : row + 1] for k, v in enc.items()}
        with torch.no_grad():
            alone = references[slot](**single).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
    set_batch_slots(layers, torch.tensor([1, BASE_SLOT]))  # no DoRA row: no scaling at all
    assert not any(layer.scale_rows for layer in layers.values())
    layers[next(iter(layers))].clear_slot(0)
    assert 0 not in layers[next(iter(layers))].dora_slots


def test_a_dora_slot_keeps_the_bias_out_of_its_scale():
    from workers.lora.layer import LoraLinear
    from workers.serving.multi_lora import MultiLoraLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12, bias=True)
    dora = LoraLinear(linear, r=4, scaling=0.5, use_dora=True)
    with torch.no_grad():
        dora.lora_B.weight.normal_(0, 0.3)
        dora.lora_magnitude_vector.mul_(1.5)
    multi = MultiLoraLinear(linear, n_slots=1, max_rank=4)
    multi.load_slot(0, dora.lora_A.weight, dora.lora_B.weight, 0.5,
                    magnitude=dora.lora_magnitude_vector.detach())  # fmt: skip
    x = torch.randn(3, 5, 16)
    set_batch_slots({"l": multi}, torch.tensor([0, BASE_SLOT, 0]))
    with torch.no_grad():
        y = multi(x)
        torch.testing.assert_close(y[[0, 2]], dora.eval()(x[[0, 2]]), atol=1e-5, rtol=0)
        torch.testing.assert_close(y[1], linear(x[1]), atol=1e-6, rtol=0)
