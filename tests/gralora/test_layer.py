"""GraLoRA layers against a reference built block by block from the paper's ``ΔW_jn = B_jn A_jn``, against peft's
own layer on the same tensors (Linear and GPT-2's ``Conv1D``, with and without the hybrid LoRA), identity at init
and PEFT's initialisations, dropout, merge/unmerge, several adapters, PEFT's refusals and warnings, files both ways
with peft, and the model-level contract on GPT-2.

The reference slices each block's own pair out of PEFT's layout (``A_jn = gralora_A[n][:, j s:(j+1) s]ᵀ``,
``B_jn = gralora_B[j][n s:(n+1) s]ᵀ``) and writes ``ΔW`` block by block with Python loops, not with the layer's
einsums.
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import GraloraConfig, GraloraLayer, GraloraModel, PeftModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5


def _adapt(kind: str = "linear", **config):
    model, x = layer_and_input(kind)
    config.setdefault("r", 4)
    config.setdefault("init_weights", False)
    config.setdefault("fan_in_fan_out", kind == "conv1D")  # GPT-2's Conv1D stores (in, out)
    pm = get_peft_model(model, GraloraConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _reference_delta(layer: GraloraLayer, name: str = "default") -> torch.Tensor:
    """``scaling (Σ blocks B_jn A_jn + B_h A_h)`` as ``(out, in)``, block by block."""
    a, b = layer.gralora_A[name].detach(), layer.gralora_B[name].detach()
    k, r = layer.gralora_k[name], layer.r[name]
    s, in_block, out_block = r // k, a.shape[1], b.shape[2]
    delta = torch.zeros(k * out_block, k * in_block, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            a_jn = a[n][:, j * s:(j + 1) * s].T.double()  # (s, in/k)
            b_jn = b[j][n * s:(n + 1) * s].T.double()  # (out/k, s)
            delta[j * out_block:(j + 1) * out_block, n * in_block:(n + 1) * in_block] = b_jn @ a_jn
    if layer.hybrid_r[name] > 0:
        delta += (layer.gralora_B_general[name].weight @ layer.gralora_A_general[name].weight).detach().double()
    return (delta * layer.scaling[name]).float()


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
@pytest.mark.parametrize("hybrid_r", [0, 3])
def test_forward_and_merge_match_the_block_reference(kind, hybrid_r):
    pm, layer, x = _adapt(kind, hybrid_r=hybrid_r, alpha=6)
    assert isinstance(layer, GraloraLayer) and isinstance(pm.base_model, GraloraModel)
    assert layer.gralora_A["default"].shape == (2, 8, 4) and layer.gralora_B["default"].shape == (2, 4, 6)
    assert layer.scaling["default"] == 6 / (4 + hybrid_r)
    delta = _reference_delta(layer)
    expected = base_output(layer, x, delta)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    stored = delta.T if kind == "conv1D" else delta  # Conv1D keeps W as (in, out)
    torch.testing.assert_close(layer.get_delta_weight("default"), stored, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    merged = pm.merge_and_unload()
    assert type(merged.layer) is (Conv1D if kind == "conv1D" else nn.Linear)
    torch.testing.assert_close(output(merged, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_update_has_rank_above_r():
    # k=4 blocks per side of rank r/k = 1 (r=4): ΔW of a 16x16 layer reaches rank k r = 16; a LoRA of r=4 stays at 4
    model, _ = layer_and_input("linear", dims=(16, 16))
    pm = get_peft_model(model, GraloraConfig(target_modules=["layer"], r=4, gralora_k=4, init_weights=False))
    delta = pm.base_model.model.layer.get_delta_weight("default").detach().double()
    assert delta.shape == (16, 16) and torch.linalg.matrix_rank(delta) == 16


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_equals_peft_layer_on_the_same_tensors(kind, hybrid_r):
    pm, layer, x = _adapt(kind, hybrid_r=hybrid_r)
    model, _ = layer_and_input(kind)
    theirs = peft.get_peft_model(model, peft.GraloraConfig(target_modules=["layer"], r=4, hybrid_r=hybrid_r,
                                                           init_weights=False, fan_in_fan_out=kind == "conv1D"))
    theirs.eval()
    their_layer = theirs.base_model.model.layer
    ours_state, their_state = pm.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(their_state)  # same names, so files cross
    with torch.no_grad():
        for key, value in ours_state.items():
            assert their_state[key].shape == value.shape, key
            their_state[key].copy_(value)
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=ATOL, rtol=1e-5)
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL)


def test_identity_at_init_and_peft_s_initialisations():
    pm, layer, x = _adapt(init_weights=True, hybrid_r=2)
    assert not layer.gralora_B["default"].any() and not layer.gralora_B_general["default"].weight.any()
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    # He-uniform bounds 1/sqrt(fan_in): each block's A sees in/k = 8 inputs, the hybrid A all 16
    a = layer.gralora_A["default"]
    assert 0.5 / math.sqrt(8) < a.abs().max() <= 1 / math.sqrt(8)
    assert layer.gralora_A_general["default"].weight.abs().max() <= 1 / math.sqrt(16)
    _, layer, _ = _adapt(init_weights=False, hybrid_r=2)
    b = layer.gralora_B["default"]
    assert 0.5 / math.sqrt(4) < b.abs().max() <= 1 / math.sqrt(4)  # fan_in r = 4
    assert isinstance(_adapt()[1].gralora_A_general["default"], nn.Identity)  # hybrid_r=0: PEFT's Identity
    defaults = GraloraConfig()
    assert (defaults.r, defaults.hybrid_r, defaults.alpha, defaults.gralora_k, defaults.init_weights) == \
        (32, 0, 64, 2, True)


def test_dropout_only_when_training():
    pm, layer, x = _adapt(gralora_dropout=0.5)
    assert isinstance(layer.gralora_dropout["default"], nn.Dropout)
    eval_out = output(pm, {"x": x})
    torch.testing.assert_close(eval_out, base_output(layer, x, _reference_delta(layer)), atol=ATOL, rtol=1e-5)
    pm.train()
    assert (output(pm, {"x": x}) - eval_out).abs().max() > 1e-3


def test_two_active_adapters_add_their_updates():
    pm, layer, x = _adapt()
    pm.add_adapter("other", GraloraConfig(target_modules=["layer"], r=2, gralora_k=2, hybrid_r=1,
                                          init_weights=False))
    layer.set_adapter(["default", "other"])
    expected = base_output(layer, x, _reference_delta(layer) + _reference_delta(layer, "other"))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)


def test_peft_s_refusals_and_warnings():
    with pytest.raises(ConfigError, match="`gralora_k` should be a positive integer value but the value passed is 0"):
        GraloraConfig(gralora_k=0)
    with pytest.raises(ConfigError, match="r should be divisible by gralora_k, but got 6 and 4"):
        GraloraConfig(r=6, gralora_k=4)
    with pytest.raises(ConfigError, match="`hybrid_r` should be a non-negative integer value"):
        GraloraConfig(hybrid_r=-1)
    with pytest.raises(ConfigError, match="`r` should be a positive integer value"):
        GraloraConfig(r=0)
    with pytest.raises(ConfigError, match="in_features should be divisible by gralora_k, but got 16 and 3"):
        _adapt(r=3, gralora_k=3)
    with pytest.raises(ConfigError, match="out_features should be divisible by gralora_k, but got 12 and 8"):
        _adapt(r=8, gralora_k=8)
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
        GraloraConfig(target_modules=".*q", layers_to_transform=[0])
    model, _ = layer_and_input("conv1D")
    config = GraloraConfig(target_modules=["layer"], r=4)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`. "
                                         "Setting fan_in_fan_out to True."):
        get_peft_model(model, config)
    assert config.fan_in_fan_out is True  # corrected, as PEFT
    model, _ = layer_and_input("linear")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        get_peft_model(model, GraloraConfig(target_modules=["layer"], r=4, fan_in_fan_out=True))


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_cross_with_peft_on_gpt2(direction, tmp_path):
    inputs = make_inputs("gpt2")
    config = {"r": 4, "hybrid_r": 2, "gralora_k": 4, "alpha": 8, "task_type": "CAUSAL_LM"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrected for Conv1D, in both libraries
        source = (peft if direction == "peft_to_ours" else __import__("deltatune")).get_peft_model(
            tiny_gpt2(), (peft.GraloraConfig if direction == "peft_to_ours" else GraloraConfig)(**config))
        perturb_trainable(source, seed=3, std=0.2)
        source.eval().save_pretrained(tmp_path)
        if direction == "peft_to_ours":
            loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
            assert isinstance(loaded.base_model, GraloraModel)
        else:
            loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    assert loaded.peft_config["default"].fan_in_fan_out is True
    torch.testing.assert_close(output(loaded, inputs), output(source, inputs), atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrected for Conv1D
        check_model_contract(tiny_gpt2, "gpt2", lambda: GraloraConfig(r=4, hybrid_r=2), "gralora_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", GraloraConfig(r=4, task_type="CAUSAL_LM"),
                       GraloraConfig(r=8, gralora_k=4, hybrid_r=2, task_type="CAUSAL_LM"), tmp_path)


def test_over_a_4bit_base():
    """Over a bitsandbytes nf4 base (beyond PEFT): identity at init, and ``merge_and_unload`` gives dense layers
    computing the adapted function."""
    pytest.importorskip("bitsandbytes")
    import deltatune

    inputs = make_inputs("llama")
    model = deltatune.quantize(tiny_llama(), "nf4")
    ref = output(model, inputs)
    pm = get_peft_model(model, GraloraConfig(r=4, hybrid_r=2, task_type="CAUSAL_LM"))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(output(pm, inputs), ref, atol=0, rtol=0)
    perturb_trainable(pm, std=0.2)
    adapted = output(pm.eval(), inputs)
    assert (adapted - ref).abs().max() > 1e-3
    plain = pm.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear  # dense, not Linear4bit
    torch.testing.assert_close(output(plain, inputs), adapted, atol=ATOL, rtol=1e-4)
