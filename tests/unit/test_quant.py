"""QLoRA's quantized base: the NF4 and int8 codecs (the fallback against bitsandbytes), the
quantized layer's forward and backward, and a base quantized under LoRA layers."""

from __future__ import annotations

import pytest
import torch

from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, lora_modules, lora_parameters
from workers.lora.errors import MergeError
from workers.lora.quant import (
    NF4_CODE,
    QuantizedLinear,
    bitsandbytes_nf4,
    dequantize_int8,
    dequantize_nf4,
    nf4_codes,
    quantize_base,
    quantize_int8,
    quantize_nf4,
)


def _w(out: int = 48, inp: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_nf4_codes_are_the_nearest_table_value_per_block_of_64():
    w = _w()
    codes, absmax = nf4_codes(w)
    blocks = w.reshape(-1, 64)
    assert torch.allclose(absmax, blocks.abs().amax(dim=1))
    normed = (blocks / absmax[:, None]).reshape(-1)
    nearest = (normed[:, None] - NF4_CODE[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), nearest)


def test_nf4_with_double_quantization_round_trips_within_its_step():
    w = _w()
    q = quantize_nf4(w)
    back = dequantize_nf4(q)
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2  # the widest half-step of the table
    err = (back - w).reshape(-1, 64).abs().amax(dim=1)
    assert (err <= absmax * (gap + 0.01)).all()  # + the 8-bit absmax's own rounding
    assert q.nbytes < 0.14 * w.numel() * 4  # ≈ 0.52 bytes a weight against 4


def test_the_fallback_nf4_equals_bitsandbytes():
    bnb = bitsandbytes_nf4()
    assert bnb is not None, "bitsandbytes is a test dependency and runs on this CPU"
    w = _w(64, 256, seed=3)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnb.dequantize_4bit(packed, state)
    codes, absmax = nf4_codes(w)
    ours = (NF4_CODE[codes.long()].reshape(-1, 64) * absmax[:, None]).reshape(w.shape)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_int8_round_trips_within_half_a_step_per_row():
    w = _w()
    q = quantize_int8(w)
    step = w.abs().amax(dim=1) / 127
    assert ((dequantize_int8(q) - w).abs() <= step[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize(("kind", "backend"), [("nf4", "lorafleet"), ("nf4", "bitsandbytes"),
                                               ("int8", "auto")])  # fmt: skip
def test_the_quantized_layer_computes_with_its_dequantized_weight(kind, backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    q = QuantizedLinear(linear, kind, backend=backend)  # type: ignore[arg-type]
    assert q.backend == ("bitsandbytes" if backend == "bitsandbytes" else "lorafleet")
    x = torch.randn(5, 96, requires_grad=True)
    y = q(x)
    w = q.weight
    torch.testing.assert_close(y, x @ w.T + linear.bias, atol=1e-5, rtol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ w, atol=1e-5, rtol=0)
    assert (q.weight - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # ≤ half a step


def test_a_base_quantized_under_lora_keeps_lora_in_full_precision(tiny_base_dir, batch):
    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4, target_modules=("q_proj", "v_proj"), use_dora=True)
    inject_lora(model, cfg)
    before = {id(p): p.dtype for p in lora_parameters(model)}
    report = quantize_base(model, "nf4")
    assert report.layers == 7 * 2 and report.ratio < 0.14  # 7 linear weights per layer, 2 layers
    for m in lora_modules(model).values():
        assert isinstance(m.base_layer, QuantizedLinear)
        assert isinstance(m.lora_A, torch.nn.Linear) and isinstance(m.lora_B, torch.nn.Linear)
    assert {id(p): p.dtype for p in lora_parameters(model)} == before
    assert not isinstance(model.lm_head, QuantizedLinear)
    # a fresh (B = 0) DoRA layer is exactly the quantized base
    plain, _ = load_base(tiny_base_dir)
    quantize_base(plain, "nf4")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=1e-5,
                                   rtol=0)  # fmt: skip
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    with pytest.raises(MergeError, match="quantized"):
        next(iter(lora_modules(model).values())).merge()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_qlora_adapter_round_trips_within_the_quantization_error(tiny_base_dir, batch,
                                                                    tmp_path, kind):  # fmt: skip
    """Trained on the quantized base, the adapter is a plain PEFT adapter for the full one: the
    logits PEFT gives with it on the unquantized base differ from the quantized training model's
    by no more than the quantized base alone differs from the full base (the tolerance)."""
    from peft import PeftModel

    from workers.lora import save_adapter

    cfg = LoraConfig(r=8, target_modules=("q_proj", "v_proj"), base_quantization=kind)
    model, _ = load_base(tiny_base_dir)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(model, cfg, tmp_path / "qlora")
    assert "base_quantization" not in (tmp_path / "qlora" / "adapter_config.json").read_text()
    quantize_base(model, kind)
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir)[0], tmp_path / "qlora")
    full, _ = load_base(tiny_base_dir)
    quantized, _ = load_base(tiny_base_dir)
    quantize_base(quantized, kind)
    with torch.no_grad():
        trained = model.eval()(**batch).logits
        reference = peft_model.eval()(**batch).logits
        base_err = (full.eval()(**batch).logits - quantized.eval()(**batch).logits).abs().mean()
    err = (trained - reference).abs().mean()
    assert err <= 1.25 * base_err, (float(err), float(base_err))
    assert float(base_err) / float(reference.abs().mean()) < (0.4 if kind == "nf4" else 0.03)
