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


# ---- AdaLoRA and (IA)³ over quantised bases -----------------------------------------------------------------
# (id, our config, PEFT config class name, kwargs): init weights off so every adapter is far from identity and a
# wrong load or merge shows in the logits.
OTHER_METHODS = {
    "adalora": ("AdaLoraConfig", {"init_r": 6, "target_r": 4, "total_step": 10, "init_lora_weights": False,
                                  "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "ia3": ("IA3Config", {"init_ia3_weights": False, "target_modules": ["k_proj", "v_proj", "down_proj"],
                          "feedforward_modules": ["down_proj"]}),
}


def other_config(method: str, lib=dt):
    cls, kwargs = OTHER_METHODS[method]
    return getattr(lib, cls)(**kwargs)


def file_layout(path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    with open(path / "adapter_config.json") as fh:
        config = json.load(fh)
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, config


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_other_methods_train_save_load_on_quantized_base(tmp_path, method, quant_type):
    torch.manual_seed(0)
    model = dt.get_peft_model(quantize(tiny_llama(), quant_type), other_config(method))
    assert type(model.base_model.model.model.layers[0].self_attn.v_proj.base_layer).__name__ in (
        "Linear4bit", "Linear8bitLt")
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    prefix = "lora_" if method == "adalora" else "ia3_"
    assert with_grad and all(prefix in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)
    logits = model(IDS).logits.detach()
    model.save_pretrained(tmp_path / "q")
    loaded = dt.PeftModel.from_pretrained(quantize(tiny_llama(), quant_type), tmp_path / "q", is_trainable=True)
    loaded.train()
    torch.testing.assert_close(loaded(IDS).logits, logits, atol=1e-6, rtol=0)
    # The file is the one a full-precision base gives: same keys, shapes, dtypes and config.
    torch.manual_seed(0)
    dt.get_peft_model(tiny_llama(), other_config(method)).save_pretrained(tmp_path / "fp32")
    assert file_layout(tmp_path / "q") == file_layout(tmp_path / "fp32")


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_other_methods_merge_and_unload_dequantizes_exactly(method, quant_type):
    model = dt.get_peft_model(quantize(tiny_llama(), quant_type), other_config(method))
    model.train()
    unmerged = model(IDS).logits.detach()
    base_off = model.get_base_model()
    with model.disable_adapter():
        no_adapter = model(IDS).logits.detach()
    assert (unmerged - no_adapter).abs().max() > 0.05  # the adapter really changes the outputs
    merged = model.merge_and_unload()
    assert merged is base_off
    assert type(merged.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    assert type(merged.model.layers[0].self_attn.o_proj).__name__ != "Linear"  # untouched layers stay quantised
    merged.train()
    torch.testing.assert_close(merged(IDS).logits, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_merge_and_report_exact_dense_and_requantized(method):
    def build():
        cfg = dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if method == "lora" \
            else other_config(method)
        return dt.get_peft_model(quantize(tiny_llama(), "nf4"), cfg)

    merged, report = dt.merge_and_report(build(), IDS, dense=True)
    assert not any(type(m).__name__ in ("Linear4bit", "Params4bit") for m in merged.modules())
    assert report["max_abs_diff"] < 1e-4 and report["requantized"] is None
    reference = build()
    reference.train()
    merged.eval()
    with torch.no_grad():  # the report's number is the real difference of the two models
        assert (merged(IDS).logits - reference(IDS).logits).abs().max().item() < 1e-4
    # An eval forward repacks 4-bit weights on CPU (bf16 scales, every later forward uses them); the report
    # compares like with like, so the merge still measures as exact.
    repacked = build()
    repacked.eval()
    with torch.no_grad():
        repacked(IDS)
    assert dt.merge_and_report(repacked, IDS)[1]["max_abs_diff"] < 1e-4

    requantized, report_q = dt.merge_and_report(build(), IDS, requantize="nf4")
    assert type(requantized.model.layers[0].self_attn.v_proj).__name__ == "Linear4bit"
    assert report_q["requantized"] == "nf4"
    assert 1e-4 < report_q["mean_abs_diff"] <= report_q["max_abs_diff"] < 1.0  # NF4 rounding of the new weights
    with pytest.raises(ConfigError, match="nf4"):
        dt.merge_and_report(build(), IDS, requantize="int3")


def test_ia3_merge_in_place_into_4bit_is_close():
    model = dt.get_peft_model(quantize(tiny_llama(), "nf4"), other_config("ia3"))
    model.train()
    out = model(IDS).logits.detach()
    model.merge_adapter()  # dequantise, scale, requantise: lossy by NF4's rounding
    merged = model(IDS).logits.detach()
    assert 0 < rel_err(merged, out) < 0.1
    model.unmerge_adapter()
    assert rel_err(model(IDS).logits.detach(), out) < 0.1


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_other_methods_interop_with_peft_on_same_quantized_base(tmp_path, method, quant_type):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = dt.get_peft_model(quantize(tiny_llama(), quant_type), other_config(method))
    ours.train()
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quantize(tiny_llama(), quant_type), tmp_path / "ours",
                                            is_trainable=True)
    assert type(theirs.base_model.model.model.layers[0].self_attn.v_proj).__module__.endswith(".bnb")
    theirs.train()
    torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, atol=1e-6, rtol=0)

    torch.manual_seed(1)
    theirs = peft.get_peft_model(quantize(tiny_llama(), quant_type), other_config(method, peft))
    theirs.train()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.PeftModel.from_pretrained(quantize(tiny_llama(), quant_type), tmp_path / "theirs",
                                          is_trainable=True)
    loaded.train()
    torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, atol=1e-6, rtol=0)


def test_quantize_lets_go_of_a_memory_mapped_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    mapped = [n for n, p in model.named_parameters() if not p.untyped_storage().resizable()]
    assert mapped  # from_pretrained maps the safetensors file
    expected = model(IDS).logits.detach()
    quantize(model, "nf4")
    assert [n for n, p in model.named_parameters() if not p.untyped_storage().resizable()] == []
    model.train()
    assert rel_err(model(IDS).logits.detach(), expected) < 0.25


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_smollm2_nf4_other_methods_cross_with_peft_and_merge_exactly(tmp_path, method):
    """SmolLM2-135M in NF4 (+ double quant): bytes under 0.35x fp32, an AdaLoRA/(IA)³ adapter over it loads in
    peft with equal logits, and the merge into the dequantised weights matches the unmerged model."""
    peft = pytest.importorskip("peft")
    models = pytest.importorskip("deltatune.builtin.models")

    def base():
        model, _ = models.load_builtin_model("smollm2-135m")
        return model

    model = base()
    fp32_bytes = weight_bytes(model)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = dt.get_peft_model(quantize(model, "nf4"), other_config(method))
    assert weight_bytes(model.get_base_model()) / fp32_bytes < 0.35  # embeddings and (tied) head counted
    with torch.no_grad():  # a trained-looking adapter: N(0, 1) factors through 30 blocks blow the logits up
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "ia3_l" in name else 0.3 * p)
    model.train()
    ours = model(ids).logits.detach()
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantize(base(), "nf4"), tmp_path)
    theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=0)
    del theirs
    with model.disable_adapter():
        assert (model(ids).logits - ours).abs().max() > 0.1  # the adapter matters
    _, report = dt.merge_and_report(model, ids, dense=True)
    assert report["max_abs_diff"] < 1e-3


def test_a_model_of_conv1d_layers_names_why_nothing_is_quantised():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="Conv1D.*BitsAndBytesConfig"):
        quantize(model, "nf4")


def test_require_bnb_drops_only_the_kernel_hub_notice(caplog):
    """bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" (its hub-kernel fallback) is dropped;
    its other warnings still reach the user."""
    import logging

    from deltatune.quantization import bnb_available, require_bnb

    assert require_bnb() is bnb and bnb_available()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


FAMILY_ON_QUANTIZED = {
    "loha": lambda: dt.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: dt.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: dt.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "oft": lambda: dt.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "boft": lambda: dt.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
}


def dense_copy_of(quantized: torch.nn.Module) -> LlamaForCausalLM:
    """A float tiny Llama whose linear weights are ``quantized``'s dequantised ones: the reference function."""
    dense = tiny_llama()
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            if type(module) is torch.nn.Linear and type(layers[name]).__name__ in ("Linear4bit", "Linear8bitLt"):
                module.weight.copy_(dequantize_weight(layers[name]))
    return dense


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("method", sorted(FAMILY_ON_QUANTIZED))
def test_family_methods_on_a_quantized_base_compute_the_dequantized_function(tmp_path, method, quant_type):
    """LoHa, LoKr, VeRA, OFT and BOFT over bitsandbytes layers: shapes from the dense (out, in), not the packed
    storage; outputs equal the same adapter on a float model holding the dequantised weights; gradients reach the
    adapter only; files as on a float base; merge_and_unload equals the unmerged model."""
    from support.models import perturb_trainable

    quantized = quantize(tiny_llama(), quant_type)
    dense = dense_copy_of(quantized)
    with torch.no_grad():
        base_logits = quantized.train()(IDS).logits
    torch.manual_seed(0)
    model = dt.get_peft_model(quantized, FAMILY_ON_QUANTIZED[method]())
    model.train()
    torch.testing.assert_close(model(IDS).logits.detach(), base_logits, atol=1e-5, rtol=0)  # identity at init
    perturb_trainable(model, seed=5, std=0.1)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    graded = [n for n, p in model.named_parameters() if p.grad is not None]
    prefix = {"loha": "hada_", "lokr": "lokr_", "vera": "vera_lambda_", "oft": "oft_", "boft": "boft_"}[method]
    assert graded and all(prefix in n for n in graded), graded
    logits = out.logits.detach()
    assert (logits - base_logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "q")
    reference = dt.PeftModel.from_pretrained(dense, tmp_path / "q").train()
    with torch.no_grad():
        torch.testing.assert_close(reference(IDS).logits, logits, atol=2e-5, rtol=0)
    torch.manual_seed(0)
    dt.get_peft_model(tiny_llama(), FAMILY_ON_QUANTIZED[method]()).save_pretrained(tmp_path / "fp32")
    assert file_layout(tmp_path / "q") == file_layout(tmp_path / "fp32")
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # dequantised where adapted
    with torch.no_grad():
        torch.testing.assert_close(merged.train()(IDS).logits, logits, atol=2e-5, rtol=0)


def test_fsdp_refuses_a_quantized_base_before_anything_else():
    """FSDP would shard the packed weights apart from their quant_state (the forward then fails inside
    bitsandbytes); wrap_fsdp says so and what to do, even before asking for a process group."""
    from deltatune.distributed import wrap_fsdp

    model = dt.get_peft_model(quantize(tiny_llama(), "nf4"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(DeltatuneError, match=r"FSDP cannot shard a bitsandbytes-quantised base \(.*q_proj is "
                                             r"quantised\); train it data-parallel instead"):
        wrap_fsdp(model)
    with pytest.raises(DeltatuneError, match="needs an initialised process group"):
        wrap_fsdp(tiny_llama())
