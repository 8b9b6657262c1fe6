"""Issue 19 item 6: ``export_to_lora`` writes any weight adapter as a plain LoRA adapter (PEFT's format).

Full-rank export reproduces the adapter's logits for every method; a truncated export's per-layer error falls as
the rank grows (and is the SVD's: kept energy); the written directory loads in peft with deltatune's logits,
GPT-2's Conv1D, changed biases (``lora_bias``) and ``modules_to_save`` included; what LoRA cannot hold is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import peft
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_net  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402

QV = ["q_proj", "v_proj"]
METHODS = {
    "dora": lambda: dt.LoraConfig(r=4, use_dora=True, target_modules=QV),
    "rslora_rank_pattern_embedding": lambda: dt.LoraConfig(r=4, use_rslora=True, rank_pattern={"q_proj": 2},
                                                           target_modules=[*QV, "embed_tokens"]),
    "loha": lambda: dt.LoHaConfig(r=4, target_modules=QV),
    "lokr": lambda: dt.LoKrConfig(r=4, target_modules=QV),
    "oft": lambda: dt.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "boft": lambda: dt.BOFTConfig(boft_block_size=4, target_modules=QV),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "vera": lambda: dt.VeraConfig(r=4, target_modules=QV),
    "adalora": lambda: dt.AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=QV),
}
IN = make_inputs("llama")


def trained(config) -> dt.PeftModel:
    model = dt.get_peft_model(tiny_llama(), config)
    perturb_trainable(model, std=0.1)
    return model.eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_full_rank_export_reproduces_the_logits_and_truncation_error_falls_with_rank(method):
    model = trained(METHODS[method]())
    original = output(model, IN)
    full = dt.export_to_lora(model, rank=64)  # >= every layer's min(out, in): exact
    assert full.report["max_rel_error"] < 1e-6
    torch.testing.assert_close(output(full.to_peft_model(tiny_llama()).eval(), IN), original, rtol=0, atol=1e-5)
    errors = [dt.export_to_lora(model, rank=r).report for r in (1, 2, 4)]
    for layer in errors[0]["layers"]:
        chain = [e["layers"][layer]["rel_error"] for e in errors]
        assert chain[0] > chain[1] > chain[2] or chain[2] < 1e-6, (layer, chain)
    assert errors[0]["max_rel_error"] > 0.1  # a rank-1 export of a random update is visibly lossy
    logit_err = (output(dt.export_to_lora(model, rank=1).to_peft_model(tiny_llama()).eval(), IN) - original).abs()
    assert logit_err.max() > 1e-4


def test_energy_keeps_that_fraction_per_layer_and_one_rank_for_all():
    model = trained(METHODS["loha"]())
    ex = dt.export_to_lora(model, energy=0.9)
    ranks = [info["rank"] for info in ex.report["layers"].values()]
    assert ex.config.r == max(ranks) and not ex.config.rank_pattern
    for info in ex.report["layers"].values():
        assert info["rel_error"] ** 2 <= 0.1 + 1e-9  # the dropped directions hold at most 10% of ‖ΔW‖²
    assert all(v.shape[0] == ex.config.r for k, v in ex.state.items() if k.endswith("lora_A.weight"))
    for name, info in ex.report["layers"].items():  # the reported error is the stored factors' error
        delta = model.base_model.model.get_submodule(name).get_delta_weight("default").detach()
        ba = ex.state[f"base_model.model.{name}.lora_B.weight"] @ ex.state[f"base_model.model.{name}.lora_A.weight"]
        assert abs(float((delta - ba).norm() / delta.norm()) - info["rel_error"]) < 1e-4
    exact = dt.export_to_lora(model, energy=1.0)
    torch.testing.assert_close(output(exact.to_peft_model(tiny_llama()).eval(), IN), output(model, IN),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "loha", "oft", "rslora_rank_pattern_embedding"])
def test_exported_dir_loads_in_peft_with_deltatunes_logits(tmp_path, method):
    model = trained(METHODS[method]())
    ex = dt.export_to_lora(model, rank=3)
    ex.save_pretrained(tmp_path)
    ours = output(dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval(), IN)
    theirs = output(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval(), IN)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, output(ex.to_peft_model(tiny_llama()).eval(), IN), rtol=0, atol=1e-6)


def gpt2_with_biases():
    """tiny GPT-2 with non-zero biases (transformers initialises them to zero)."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_gpt2_conv1d_and_a_changed_bias_export_exactly_and_load_in_peft(tmp_path):
    # IA3 on GPT-2's c_attn (not feedforward) scales the output rows: weight *and* bias change.
    model = dt.get_peft_model(gpt2_with_biases(), dt.IA3Config(target_modules=["c_attn", "c_fc"],
                                                        feedforward_modules=["c_fc"]))
    perturb_trainable(model, std=0.3)
    inputs = make_inputs("gpt2")
    ex = dt.export_to_lora(model.eval(), rank=96)
    assert ex.config.fan_in_fan_out and ex.config.lora_bias and ex.report["lora_bias"]
    ex.save_pretrained(tmp_path)
    theirs = output(peft.PeftModel.from_pretrained(gpt2_with_biases(), str(tmp_path)).eval(), inputs)
    torch.testing.assert_close(theirs, output(model, inputs), rtol=0, atol=1e-5)


def test_modules_to_save_are_carried_as_peft_lora_carries_them(tmp_path):
    model = dt.get_peft_model(tiny_bert(), dt.LoHaConfig(r=4, target_modules=["query", "value"],
                                                         modules_to_save=["classifier"], task_type="SEQ_CLS"))
    perturb_trainable(model, std=0.2)
    inputs = make_inputs("bert")
    ex = dt.export_to_lora(model.eval(), rank=32)
    assert ex.config.modules_to_save == model.peft_config["default"].modules_to_save  # classifier (+ score)
    ex.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, inputs), output(model, inputs), rtol=0, atol=1e-5)


def test_conv_and_embedding_layers_export_exactly():
    model = dt.get_peft_model(tiny_net(), dt.LoHaConfig(r=2, target_modules=["conv1d", "conv2d", "lin1"]))
    perturb_trainable(model, std=0.2)
    inputs = make_inputs("net")
    ex = dt.export_to_lora(model.eval(), rank=64)
    torch.testing.assert_close(output(ex.to_peft_model(tiny_net()).eval(), inputs), output(model, inputs),
                               rtol=0, atol=1e-5)


def test_what_lora_cannot_hold_is_refused():
    model = trained(METHODS["loha"]())
    with pytest.raises(ConfigError, match="exactly one of rank"):
        dt.export_to_lora(model)
    with pytest.raises(ConfigError, match="exactly one of rank"):
        dt.export_to_lora(model, rank=4, energy=0.9)
    with pytest.raises(ConfigError, match=r"energy must be in \(0, 1\]"):
        dt.export_to_lora(model, energy=1.5)
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        dt.export_to_lora(model, rank=4, adapter_name="x")
    model.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        dt.export_to_lora(model, rank=4)
    prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="no weight delta"):
        dt.export_to_lora(prompt, rank=4)
