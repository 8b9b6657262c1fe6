"""MiSS layers (balance, mini, bat) against reference math on ``nn.Linear`` and GPT-2's ``Conv1D``, equality with
peft's own layer on the same tensors, files both ways with peft, identity at init, merge/unmerge, several adapters,
PEFT's refusals, and the model-level contract (tiny Llama, GPT-2, BERT).

References are computed here from the layer's block with index arithmetic (``D[i mod r, o]``) and an explicit loop
over the ``r×r`` blocks of ``W`` (bat), not the reshapes the layer uses.
"""

from __future__ import annotations

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import MissConfig, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5

# (variant name, config kwargs) on the (12 out, 16 in) test layers: r=3 leaves a zero-padded shard of width 1
VARIANTS = {
    "balance": {"r": 4, "init_weights": True},
    "balance_padded": {"r": 3, "init_weights": True},
    "random": {"r": 3, "init_weights": False},
    "mini": {"r": 3, "mini_r": 4, "init_weights": "mini"},
    "bat": {"r": 4, "init_weights": "bat"},
}


def _adapt(kind: str, variant: str, perturb: bool = True):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, MissConfig(target_modules=["layer"], **VARIANTS[variant])).eval()
    if perturb:
        perturb_trainable(pm, std=0.2)
    return pm, pm.base_model.model.layer, x


def _dense_w(layer: nn.Module) -> torch.Tensor:
    """The base weight as ``(out, in)``."""
    w = layer.base_layer.weight.detach()
    return w.T if isinstance(layer.base_layer, Conv1D) else w


def _reference_weight(layer: nn.Module, name: str = "default", w: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted ``W': (out, in)`` from the paper's formulas, for adapter ``name`` over ``w`` (default the base)."""
    w = _dense_w(layer) if w is None else w
    out_f, in_f = w.shape
    block = layer.miss_block[name].detach()
    variant = layer.miss_variant[name]
    if variant == "bat":
        r = block.shape[-1]
        new = w.clone()
        for a in range(out_f // r):
            for c in range(in_f // r):
                w_ac = w[a * r:(a + 1) * r, c * r:(c + 1) * r]
                new[a * r:(a + 1) * r, c * r:(c + 1) * r] = w_ac + w_ac @ block[a] + block[a]
        return new
    if variant == "mini":  # D_full[j, o] = D[j, o mod mini_r]
        block = block[:, torch.arange(out_f) % block.shape[1]]
    r = block.shape[0]
    return w + block[torch.arange(in_f) % r].T  # ΔW[o, i] = D[i mod r, o]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_matches_reference(kind, variant):
    pm, layer, x = _adapt(kind, variant)
    delta = _reference_weight(layer) - _dense_w(layer)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


def test_block_shapes_are_peft_s():
    shapes = {v: _adapt("linear", v)[1].miss_block["default"].shape for v in VARIANTS}
    assert shapes == {"balance": (4, 12), "balance_padded": (3, 12), "random": (3, 12), "mini": (3, 4),
                      "bat": (3, 4, 4)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_identity_at_init_and_merge(kind, variant):
    pm, layer, x = _adapt(kind, variant, perturb=False)
    if variant == "random":  # init_weights=False: a He-uniform block, not the identity
        assert torch.count_nonzero(layer.miss_block["default"]) > 0
        assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-3
    else:
        assert torch.count_nonzero(layer.miss_block["default"]) == 0
        torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    perturb_trainable(pm, std=0.2)
    assert_merge_round_trip(pm, layer, x, output(pm, {"x": x}), atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_peft_layer_on_the_same_tensors(variant, dtype):
    """Same base, same block: peft's MissLinear and ours give the same output and the same merged weight (over a
    bf16 base too, where both keep the block in fp32)."""
    model, x = layer_and_input("linear")
    pm = get_peft_model(model.to(dtype), MissConfig(target_modules=["layer"], **VARIANTS[variant])).eval()
    perturb_trainable(pm, std=0.2)
    layer, x = pm.base_model.model.layer, x.to(dtype)
    assert layer.miss_block["default"].dtype == torch.float32
    model, _ = layer_and_input("linear")
    theirs = peft.get_peft_model(model.to(dtype), peft.MissConfig(target_modules=["layer"], **VARIANTS[variant]))
    theirs.eval()
    their_layer = theirs.base_model.model.layer
    with torch.no_grad():
        their_layer.miss_block["default"].copy_(layer.miss_block["default"])
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL, unmerge_atol=1e-5)


@pytest.mark.parametrize("variant", ["bat", "mini", "random"])
def test_files_cross_both_ways_with_peft(variant, tmp_path):
    """The other variants than the contract's balance row: peft loads ours and we load peft's, equal logits."""
    inputs = make_inputs("llama")
    config = {"r": 4, "mini_r": 4, "init_weights": VARIANTS[variant]["init_weights"]}
    ours = get_peft_model(tiny_llama(), MissConfig(task_type="CAUSAL_LM", **config))
    perturb_trainable(ours, seed=3, std=0.2)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours.eval(), inputs), atol=ATOL, rtol=0)

    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(task_type="CAUSAL_LM", **config))
    perturb_trainable(theirs, seed=4, std=0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    assert loaded.peft_config["default"].init_weights == config["init_weights"]
    torch.testing.assert_close(output(loaded, inputs), output(theirs.eval(), inputs), atol=ATOL, rtol=0)


def test_two_active_bat_adapters_apply_in_turn():
    """W'' = bat_2(bat_1(W)): the second adapter's update is taken on the weight the first one left."""
    pm, layer, x = _adapt("linear", "bat")
    pm.add_adapter("other", MissConfig(target_modules=["layer"], r=2, init_weights="bat"))
    pm.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        layer.miss_block["other"].normal_(std=0.2)
    w = _reference_weight(layer, "other", _reference_weight(layer, "default"))
    expected = base_output(layer, x, w - _dense_w(layer))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_two_active_balance_and_mini_adapters_add():
    pm, layer, x = _adapt("linear", "balance_padded")
    pm.add_adapter("other", MissConfig(target_modules=["layer"], **VARIANTS["mini"]))
    pm.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        layer.miss_block["other"].normal_(std=0.2)
    w = _dense_w(layer)
    delta = (_reference_weight(layer, "default") - w) + (_reference_weight(layer, "other") - w)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


def test_dropout_acts_on_the_input_in_training_only():
    model, x = layer_and_input("linear")
    pm = get_peft_model(model, MissConfig(target_modules=["layer"], r=4, miss_dropout=0.5))
    perturb_trainable(pm, std=0.2)
    layer = pm.base_model.model.layer
    assert isinstance(layer.miss_dropout["default"], nn.Dropout)
    expected = base_output(layer, x, _reference_weight(layer) - _dense_w(layer))
    pm.train()
    assert (output(pm, {"x": x}) - expected).abs().max() > 1e-3
    pm.eval()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def _peft_message(config: dict) -> str:
    model, _ = layer_and_input("linear")
    with pytest.raises(ValueError) as caught:
        peft.get_peft_model(model, peft.MissConfig(target_modules=["layer"], **config))
    return str(caught.value)


@pytest.mark.parametrize("config", [{"r": 20}, {"r": 3, "init_weights": "bat"}, {"r": 0},
                                    {"r": 4, "mini_r": 5, "init_weights": "mini"}],
                         ids=["r_over_in", "bat_blocks", "r_zero", "mini_r"])
def test_refusals_begin_with_peft_s_sentence(config):
    model, _ = layer_and_input("linear")
    with pytest.raises(ConfigError) as caught:
        get_peft_model(model, MissConfig(target_modules=["layer"], **config))
    theirs = _peft_message(config)
    assert str(caught.value).startswith(theirs), (str(caught.value), theirs)
    assert isinstance(caught.value, ValueError)


def test_unknown_init_weights_and_layer_type_are_refused():
    with pytest.raises(ConfigError, match="init_weights"):
        MissConfig(init_weights="pissa")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        MissConfig(target_modules="layer", layers_to_transform=[0])
    model, _ = layer_and_input("embedding")
    with pytest.raises(ValueError):
        get_peft_model(model, MissConfig(target_modules=["layer"], r=2))


def test_config_fields_and_defaults_match_peft():
    ours, theirs = MissConfig().to_dict(), peft.MissConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


def test_repr_names_peft_s_layer():
    _, layer, _ = _adapt("linear", "balance")
    assert repr(layer).startswith("miss.MissLinear(")


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama_balance", tiny_llama, "llama", lambda: MissConfig(r=4, task_type="CAUSAL_LM")),
    ("gpt2_bat", tiny_gpt2, "gpt2", lambda: MissConfig(r=4, init_weights="bat", target_modules=["c_attn", "c_fc"])),
    ("bert_mini", tiny_bert, "bert", lambda: MissConfig(r=4, mini_r=4, init_weights="mini", task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    check_model_contract(factory, kind, config, "miss_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", MissConfig(r=4),
                       MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "down_proj"]), tmp_path)


@pytest.mark.parametrize("init", [True, "bat"], ids=["balance", "bat"])
def test_over_a_4bit_base(init):
    """Over a bitsandbytes nf4 base: identity at init, and ``merge_and_unload`` gives dense layers computing the
    adapted function (bat reads the dequantised weight; PEFT refuses bat where its backend cannot dequantise)."""
    pytest.importorskip("bitsandbytes")
    inputs = make_inputs("llama")
    model = deltatune.quantize(tiny_llama(), "nf4")
    ref = output(model, inputs)
    pm = get_peft_model(model, MissConfig(r=4, init_weights=init, task_type="CAUSAL_LM"))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(output(pm, inputs), ref, atol=0, rtol=0)
    perturb_trainable(pm, std=0.2)
    adapted = output(pm.eval(), inputs)
    assert (adapted - ref).abs().max() > 1e-3
    plain = pm.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear  # dense, not Linear4bit
    torch.testing.assert_close(output(plain, inputs), adapted, atol=ATOL, rtol=1e-4)
