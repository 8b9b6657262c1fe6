"""FourierFT layers against a reference written from the paper's cosine sum (no FFT), the positions and the layer
against peft's own on the same tensors (Linear and GPT-2's ``Conv1D``), PEFT's initialisations, merge/unmerge,
several adapters, ``n_frequency_pattern``, PEFT's refusals and warnings, files both ways with peft, and the
model-level contract on GPT-2.

The reference: ``ΔW[u, v] = scaling / (out · in) · Σ_l c_l cos(2π (p_l u / out + q_l v / in))``, the real part of
the inverse 2-D DFT of a spectrum that is ``c_l`` at ``(p_l, q_l)`` and zero elsewhere, summed term by term.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import FourierFTConfig, FourierFTLayer, FourierFTModel, PeftModel, get_peft_model
from deltatune.errors import ConfigError
from deltatune.fourierft.layer import spectral_positions

ATOL = 1e-5


def _adapt(kind: str = "linear", **config):
    model, x = layer_and_input(kind)
    config.setdefault("n_frequency", 20)
    config.setdefault("scaling", 30.0)
    config.setdefault("fan_in_fan_out", kind == "conv1D")  # GPT-2's Conv1D stores (in, out)
    pm = get_peft_model(model, FourierFTConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _reference_delta(layer: FourierFTLayer, name: str = "default") -> torch.Tensor:
    """``(out, in)``, from the cosine sum over the learned entries, in float64."""
    out_f, in_f = layer.out_features, layer.in_features
    c = layer.fourierft_spectrum[name].detach().double()
    rows, cols = layer.indices[name]
    u = torch.arange(out_f, dtype=torch.float64)[:, None]
    v = torch.arange(in_f, dtype=torch.float64)[None, :]
    delta = torch.zeros(out_f, in_f, dtype=torch.float64)
    for c_l, p, q in zip(c, rows.tolist(), cols.tolist(), strict=True):
        delta += c_l * torch.cos(2 * math.pi * (p * u / out_f + q * v / in_f))
    return (delta * layer.fourierft_scaling[name] / (out_f * in_f)).float()


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_forward_and_merge_match_the_cosine_reference(kind):
    pm, layer, x = _adapt(kind)
    assert isinstance(layer, FourierFTLayer) and isinstance(pm.base_model, FourierFTModel)
    assert layer.fourierft_spectrum["default"].shape == (20,) and layer.indices["default"].shape == (2, 20)
    assert (layer.in_features, layer.out_features) == (16, 12)
    delta = _reference_delta(layer)
    expected = base_output(layer, x, delta)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    stored = delta.T if kind == "conv1D" else delta  # Conv1D keeps W as (in, out)
    torch.testing.assert_close(layer.get_delta_weight("default"), stored, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    merged = pm.merge_and_unload()
    assert type(merged.layer) is (Conv1D if kind == "conv1D" else nn.Linear)
    torch.testing.assert_close(output(merged, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_positions_are_peft_s_seeded_draw():
    positions = spectral_positions(12, 16, 20, 777)
    flat = torch.randperm(12 * 16, generator=torch.Generator().manual_seed(777))[:20]
    assert torch.equal(positions[0] * 16 + positions[1], flat)
    assert not torch.equal(spectral_positions(12, 16, 20, 778), positions)  # another seed, other positions
    _, layer, _ = _adapt(random_loc_seed=5)
    assert torch.equal(layer.indices["default"], spectral_positions(12, 16, 20, 5))


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_equals_peft_layer_on_the_same_tensors(kind):
    pm, layer, x = _adapt(kind)
    model, _ = layer_and_input(kind)
    theirs = peft.get_peft_model(model, peft.FourierFTConfig(target_modules=["layer"], n_frequency=20, scaling=30.0,
                                                             fan_in_fan_out=kind == "conv1D")).eval()
    their_layer = theirs.base_model.model.layer
    assert torch.equal(their_layer.indices["default"], layer.indices["default"])  # same positions, from the seed
    ours_state, their_state = pm.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(their_state)
    with torch.no_grad():
        for key, value in ours_state.items():
            their_state[key].copy_(value)
    delta = layer.get_delta_weight("default")
    their_delta = their_layer.get_delta_weight("default")  # PEFT's keeps (out, in) for Conv1D too
    torch.testing.assert_close(delta.T if kind == "conv1D" else delta, their_delta, atol=ATOL, rtol=1e-5)
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL)


def test_peft_s_initialisations():
    pm, layer, x = _adapt()  # PEFT's default init_weights=False: N(0, 1), not the identity
    spectrum = layer.fourierft_spectrum["default"]
    assert spectrum.dtype == torch.float32 and spectrum.std() > 0.3
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-3
    pm, layer, x = _adapt(init_weights=True)
    assert not layer.fourierft_spectrum["default"].any()
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    defaults = FourierFTConfig()
    assert (defaults.n_frequency, defaults.scaling, defaults.random_loc_seed, defaults.init_weights) == \
        (1000, 150.0, 777, False)


def test_half_precision_base_keeps_a_float32_spectrum():
    model, x = layer_and_input("linear")
    pm = get_peft_model(model.to(torch.bfloat16), FourierFTConfig(target_modules=["layer"], n_frequency=20))
    layer = pm.base_model.model.layer
    assert layer.fourierft_spectrum["default"].dtype == torch.float32
    assert pm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_two_active_adapters_and_n_frequency_pattern():
    pm, layer, x = _adapt()
    pm.add_adapter("other", FourierFTConfig(target_modules=["layer"], n_frequency=5,
                                            n_frequency_pattern={"layer": 7}, random_loc_seed=1))
    assert layer.fourierft_spectrum["other"].shape == (7,)  # the pattern's full-name key
    layer.set_adapter(["default", "other"])
    expected = base_output(layer, x, _reference_delta(layer) + _reference_delta(layer, "other"))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)
    config = FourierFTConfig(n_frequency=4, n_frequency_pattern={"q_proj": 8})
    assert config.n_frequency_for("model.layers.0.self_attn.q_proj") == 8
    assert config.n_frequency_for("model.layers.0.self_attn.v_proj") == 4


def test_peft_s_refusals_and_warnings():
    with pytest.raises(ConfigError, match="`n_frequency` should be less than or equal to the product of the input "
                                          "and output dimensions but the value passed is 193 and the product is 192"):
        _adapt(n_frequency=193)
    with pytest.raises(ConfigError, match="`n_frequency` should be a positive integer value"):
        FourierFTConfig(n_frequency=0)
    with pytest.raises(ConfigError, match="When `layers_pattern` is specified, `layers_to_transform` must also be"):
        FourierFTConfig(layers_pattern="layers")
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
        FourierFTConfig(target_modules=".*q", layers_pattern="layers", layers_to_transform=[0])
    model, _ = layer_and_input("conv1D")
    config = FourierFTConfig(target_modules=["layer"], n_frequency=4)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`. "
                                         "Setting fan_in_fan_out to True."):
        get_peft_model(model, config)
    assert config.fan_in_fan_out is True  # corrected, as PEFT
    model, _ = layer_and_input("linear")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        get_peft_model(model, FourierFTConfig(target_modules=["layer"], n_frequency=4, fan_in_fan_out=True))


@pytest.mark.parametrize("lib", [peft, deltatune], ids=["peft_to_ours", "ours_to_peft"])
def test_files_cross_with_peft_on_gpt2(lib, tmp_path):
    # GPT-2's default target is mlp.c_proj (Conv1D 128 -> 32); the positions are drawn again from the seed on load
    inputs = make_inputs("gpt2")
    config = {"n_frequency": 40, "n_frequency_pattern": {"c_proj": 24}, "scaling": 20.0, "random_loc_seed": 3,
              "fan_in_fan_out": True, "task_type": "CAUSAL_LM"}
    source = lib.get_peft_model(tiny_gpt2(), lib.FourierFTConfig(**config))
    perturb_trainable(source, seed=3, std=0.5)
    source.eval().save_pretrained(tmp_path)
    loader = deltatune.PeftModel if lib is peft else peft.PeftModel
    loaded = loader.from_pretrained(tiny_gpt2(), tmp_path).eval()
    if lib is peft:
        assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model, FourierFTModel)
    assert loaded.base_model.model.transformer.h[0].mlp.c_proj.fourierft_spectrum["default"].shape == (24,)
    torch.testing.assert_close(output(loaded, inputs), output(source, inputs), atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    def config():
        return FourierFTConfig(n_frequency=32, scaling=20.0, fan_in_fan_out=True, init_weights=True)

    check_model_contract(tiny_gpt2, "gpt2", config, "fourierft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", FourierFTConfig(n_frequency=16, init_weights=True, task_type="CAUSAL_LM"),
                       FourierFTConfig(n_frequency=8, random_loc_seed=1, init_weights=True, task_type="CAUSAL_LM"),
                       tmp_path)


def test_over_a_4bit_base():
    """Over a bitsandbytes nf4 base (beyond PEFT): identity at init (zeros), and ``merge_and_unload`` gives dense
    layers computing the adapted function."""
    pytest.importorskip("bitsandbytes")
    inputs = make_inputs("llama")
    model = deltatune.quantize(tiny_llama(), "nf4")
    ref = output(model, inputs)
    pm = get_peft_model(model, FourierFTConfig(n_frequency=64, init_weights=True, task_type="CAUSAL_LM"))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(output(pm, inputs), ref, atol=0, rtol=0)
    perturb_trainable(pm, std=0.2)
    adapted = output(pm.eval(), inputs)
    assert (adapted - ref).abs().max() > 1e-3
    plain = pm.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear  # dense, not Linear4bit
    torch.testing.assert_close(output(plain, inputs), adapted, atol=ATOL, rtol=1e-4)
