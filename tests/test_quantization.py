"""QLoRA: quantised bases through bitsandbytes (CPU), LoRA/DoRA on top, files and merges.

bitsandbytes repacks 4-bit weights for a bf16 CPU kernel on no-grad eval forwards, so comparisons that must
be exact run in train mode (dropout 0), where every path computes in fp32.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.quantization import dequantize_weight, quantize, weight_bytes

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("quant_type, layer_cls, max_err", [
    ("nf4", "Linear4bit", 0.25), ("fp4", "Linear4bit", 0.35), ("int8", "Linear8bitLt", 0.05)])
def test_quantize_replaces_linears_and_stays_close(quant_type, layer_cls, max_err):
    ref = tiny_llama()
    with torch.no_grad():
        expected = ref(IDS).logits
    model = quantize(tiny_llama(), quant_type)
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == layer_cls
    assert attn.q_proj.weight.dtype in (torch.uint8, torch.int8)
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays in full precision
    model.train()
    err = rel_err(model(IDS).logits.detach(), expected)
    assert 0 < err < max_err


def test_nf4_double_quant_weight_bytes():
    def wide() -> LlamaForCausalLM:  # wide enough that the scales, not per-layer codebooks, dominate
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))

    fp32 = weight_bytes(wide())
    nf4 = weight_bytes(quantize(wide(), "nf4", double_quant=True))
    nf4_plain = weight_bytes(quantize(wide(), "nf4", double_quant=False))
    assert nf4 < nf4_plain < fp32
    assert nf4 / fp32 < 0.35  # embeddings and head stay fp32 and are counted


def test_dequantize_matches_forward_and_survives_cpu_repacking():
    model = quantize(tiny_llama(), "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    w = dequantize_weight(layer)
    layer.train()
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        layer(x)  # may repack the weight for bitsandbytes' CPU kernel
    torch.testing.assert_close(dequantize_weight(layer), w, atol=0.02, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_lora_on_quantized_base_trains_saves_loads(tmp_path, quant_type, use_dora):
    model = dt.get_peft_model(quantize(tiny_llama(), quant_type),
                              dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                            use_dora=use_dora))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    out = model(IDS).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(quantize(tiny_llama(), quant_type), tmp_path, is_trainable=True)
    loaded.train()
    torch.testing.assert_close(loaded(IDS).logits, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_dequantizes_exactly(use_dora):
    model = dt.get_peft_model(quantize(tiny_llama(), "nf4"),
                              dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                            use_dora=use_dora))
    model.train()
    out = model(IDS).logits.detach()
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    merged.train()
    torch.testing.assert_close(merged(IDS).logits, out, atol=1e-5, rtol=0)
    requantized = quantize(merged, "nf4")  # on request, back to 4-bit
    assert type(requantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_merge_in_place_into_4bit_is_close_and_into_int8_refused():
    model = dt.get_peft_model(quantize(tiny_llama(), "nf4"),
                              dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.train()
    out = model(IDS).logits.detach()
    model.merge_adapter()  # dequantise, add, requantise: lossy by NF4's rounding
    assert rel_err(model(IDS).logits.detach(), out) < 0.1
    int8 = dt.get_peft_model(quantize(tiny_llama(), "int8"), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="merge_and_unload"):
        int8.merge_adapter()


@pytest.mark.parametrize("use_dora", [False, True])
def test_interop_with_peft_on_same_quantized_base(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    ours = dt.get_peft_model(quantize(tiny_llama(), "nf4"),
                             dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                           use_dora=use_dora))
    ours.train()
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quantize(tiny_llama(), "nf4"), tmp_path / "ours", is_trainable=True)
    theirs.train()
    torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, atol=1e-6, rtol=0)

    theirs = peft.get_peft_model(quantize(tiny_llama(), "nf4"),
                                 peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                 use_dora=use_dora))
    theirs.train()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.PeftModel.from_pretrained(quantize(tiny_llama(), "nf4"), tmp_path / "theirs", is_trainable=True)
    loaded.train()
    torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, atol=1e-6, rtol=0)


def test_prepare_model_for_kbit_training():
    model = tiny_llama().to(torch.bfloat16)
    model = quantize(model, "nf4", compute_dtype=torch.bfloat16)
    dt.prepare_model_for_kbit_training(model)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    peft_model = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_quant_type_and_missing_bitsandbytes(monkeypatch):
    with pytest.raises(ConfigError, match="nf4"):
        quantize(tiny_llama(), "int3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(DeltatuneError, match=r"pip install 'deltatune\[qlora\]'"):
        quantize(tiny_llama(), "nf4")
