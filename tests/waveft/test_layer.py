"""WaveFT: the wavelet filters against PyWavelets' values (as PEFT ships them) and against their defining equations,
the inverse transform against a reference summed term by term from its formula and against PEFT's ``waverec2d``,
the layer against a reference ``ΔW`` and against peft's layer on the same coefficients, identity at init, PEFT's
initialisation and refusals, ``n_frequency_pattern`` / ``proportional_parameters`` as PEFT counts them, files both
ways with peft, the model-level contract on GPT-2's ``Conv1D``, and two named adapters.
"""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
import torch
from peft.tuners.waveft.wavelet import Wavelet as PeftWavelet
from peft.tuners.waveft.waverec2d import waverec2d as peft_waverec2d
from support.family_checks import check_model_contract, check_two_adapters
from support.models import Holder, make_inputs, output, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import PeftModel, WaveFTConfig, WaveFTLayer, WaveFTModel, get_peft_model
from deltatune.errors import ConfigError
from deltatune.waveft.wavelets import SUPPORTED_FAMILIES, idwt2, reconstruction_filters

ATOL = 1e-5
PEFT_HAS = [f"db{n}" for n in range(1, 11)] + [f"sym{n}" for n in range(2, 11)] + ["coif1", "coif2", "coif3"]


# ---- the filters and the transform ---------------------------------------------------------------------------------
def test_filters_equal_pywavelets_values_as_peft_ships_them():
    for name in PEFT_HAS:
        lo, hi = reconstruction_filters(name)
        theirs = PeftWavelet(name)
        assert torch.allclose(lo, torch.tensor(theirs.rec_lo, dtype=torch.float64), atol=1e-11), name
        assert torch.allclose(hi, torch.tensor(theirs.rec_hi, dtype=torch.float64), atol=1e-11), name


@pytest.mark.parametrize("name", ["db15", "db20", "sym7", "coif3"])
def test_filters_satisfy_their_defining_equations(name):
    lo, _ = reconstruction_filters(name)
    length = len(lo)
    k = torch.arange(length, dtype=torch.float64)
    assert math.isclose(lo.sum().item(), math.sqrt(2), abs_tol=1e-12)
    for j in range(length // 2):  # orthonormal shifts by 2
        assert abs((lo[: length - 2 * j] * lo[2 * j:]).sum().item() - float(j == 0)) < 1e-11
    moments = length // 3 if name.startswith("coif") else length // 2
    for m in range(moments):  # vanishing wavelet moments: H has a zero of that order at ω = π
        assert abs(((-1.0) ** k * (k / length) ** m * lo).sum().item()) < 1e-9


def _reference_idwt(bands: list[torch.Tensor], name: str) -> torch.Tensor:
    """``X[p, q] = Σ_bands Σ_{i,j} c[i, j] f_row[p + L - 2 - 2i] f_col[q + L - 2 - 2j]``, summed with loops."""
    lo, hi = (f.tolist() for f in reconstruction_filters(name))
    length = len(lo)
    a, b = bands[0].shape
    pairs = [(lo, lo), (hi, lo), (lo, hi), (hi, hi)]  # approx, horizontal, vertical, diagonal
    out = torch.zeros(2 * a - length + 2, 2 * b - length + 2, dtype=torch.float64)
    for band, (f_row, f_col) in zip(bands, pairs):
        for p in range(out.shape[0]):
            for q in range(out.shape[1]):
                total = 0.0
                for i in range(a):
                    u = p + length - 2 - 2 * i
                    if not 0 <= u < length:
                        continue
                    for j in range(b):
                        v = q + length - 2 - 2 * j
                        if 0 <= v < length:
                            total += float(band[i, j]) * f_row[u] * f_col[v]
                out[p, q] += total
    return out


@pytest.mark.parametrize("name", ["db1", "db3", "sym4", "coif1"])
def test_inverse_transform_equals_the_formula_and_peft_s(name):
    torch.manual_seed(0)
    bands = [torch.randn(6, 5, dtype=torch.float64) for _ in range(4)]
    ours = idwt2(*bands, name)
    assert torch.allclose(ours, _reference_idwt(bands, name), atol=1e-10)
    assert torch.allclose(ours, peft_waverec2d((bands[0], tuple(bands[1:])), name), atol=1e-10)


# ---- the layer -----------------------------------------------------------------------------------------------------
def _adapt(base: nn.Module, **config) -> tuple[nn.Module, WaveFTLayer]:
    torch.manual_seed(0)
    config.setdefault("n_frequency", 20)
    config.setdefault("init_weights", False)
    pm = get_peft_model(Holder(base), WaveFTConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer


def _reference_delta(layer: WaveFTLayer, name: str = "default") -> torch.Tensor:
    """``ΔW: (out, in)`` from the paper's recipe, written out: the coefficients at their seeded places of a padded
    even grid, its quarters as the four bands, the loop-summed inverse transform, the first ``out x in``."""
    out_f, in_f = layer.out_features, layer.in_features
    n, seed = layer.waveft_n_frequency[name], layer.waveft_random_loc_seed[name]
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    values = layer.waveft_spectrum[name].detach().double()
    family, scaling = layer.waveft_wavelet_family[name], layer.waveft_scaling[name]
    if not layer.waveft_use_idwt[name]:
        dense = torch.zeros(out_f, in_f, dtype=torch.float64)
        dense[flat // in_f, flat % in_f] = values
        return dense * scaling
    pad = len(reconstruction_filters(family)[0]) - 2
    height, width = out_f + pad + (out_f + pad) % 2, in_f + pad + (in_f + pad) % 2
    grid = torch.zeros(height, width, dtype=torch.float64)
    grid[flat // in_f + (height - out_f) // 2, flat % in_f + (width - in_f) // 2] = values
    h2, w2 = height // 2, width // 2
    bands = [grid[:h2, :w2], grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:]]
    return _reference_idwt(bands, family)[:out_f, :in_f] * scaling


@pytest.mark.parametrize("kind,family,use_idwt", [("linear", "db1", True), ("linear", "sym3", True),
                                                   ("conv1D", "db2", True), ("linear", "db2", False)])
def test_layer_forward_and_merge_match_the_reference(kind, family, use_idwt):
    torch.manual_seed(1)
    base = nn.Linear(7, 5) if kind == "linear" else Conv1D(5, 7)  # odd sizes: the padding rounds up
    pm, layer = _adapt(base, wavelet_family=family, use_idwt=use_idwt, scaling=3.0)
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        weight = base.weight if kind == "linear" else base.weight.T  # (out, in)
        delta = _reference_delta(layer).float()
        expected = x @ (weight + delta).T + base.bias
        assert torch.allclose(pm(x), expected, atol=ATOL)
        assert torch.allclose(layer.get_delta_weight("default"), delta if kind == "linear" else delta.T, atol=ATOL)
        layer.merge()
        assert torch.allclose(pm(x), expected, atol=ATOL)
        layer.unmerge()
        assert torch.allclose(base.weight if kind == "linear" else base.weight.T, weight)
        merged = pm.merge_and_unload()
        assert type(merged.layer) is type(base)
        assert torch.allclose(merged(x), expected, atol=ATOL)


@pytest.mark.parametrize("family,use_idwt,shape", [("db1", True, (12, 10)), ("db3", True, (9, 11)),
                                                    ("coif1", True, (8, 8)), ("db1", False, (6, 10))])
def test_equal_to_peft_layer_on_the_same_coefficients(family, use_idwt, shape):
    out_f, in_f = shape
    kwargs = {"n_frequency": 30, "wavelet_family": family, "use_idwt": use_idwt, "random_loc_seed": 5,
              "init_weights": False, "scaling": 2.0}
    torch.manual_seed(2)
    ours, layer = _adapt(nn.Linear(in_f, out_f), **kwargs)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(Holder(nn.Linear(in_f, out_f)), peft.WaveFTConfig(target_modules=["layer"],
                                                                                    **kwargs)).eval()
    their_layer = theirs.base_model.model.layer
    assert torch.equal(layer.waveft_indices["default"], their_layer.waveft_indices["default"])
    with torch.no_grad():
        their_layer.waveft_spectrum["default"].copy_(torch.randn(30))
        layer.waveft_spectrum["default"].copy_(their_layer.waveft_spectrum["default"])
        x = torch.randn(3, in_f)
        assert torch.allclose(ours(x), theirs(x), atol=ATOL)
        assert torch.allclose(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"), atol=ATOL)


def test_identity_at_init_and_peft_s_initialisation():
    base = nn.Linear(16, 8)
    _, layer = _adapt(base, init_weights=True)
    assert not layer.waveft_spectrum["default"].any()
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), base(x))
    _, layer = _adapt(nn.Linear(64, 64), n_frequency=4000)
    assert 0.008 < layer.waveft_spectrum["default"].std().item() < 0.012  # N(0, 0.01²)
    config = WaveFTConfig()
    assert (config.n_frequency, config.scaling, config.wavelet_family, config.use_idwt, config.random_loc_seed,
            config.init_weights, config.proportional_parameters) == (2592, 25.0, "db1", True, 777, True, False)


def test_coefficients_stay_float32_over_a_half_precision_base():
    _, layer = _adapt(nn.Linear(8, 8).to(torch.bfloat16))
    assert layer.waveft_spectrum["default"].dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_two_active_adapters_add_their_updates():
    pm, layer = _adapt(nn.Linear(8, 8))
    pm.add_adapter("other", WaveFTConfig(target_modules=["layer"], n_frequency=10, wavelet_family="db2",
                                         init_weights=False))
    layer.set_adapter(["default", "other"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (layer.get_delta_weight("default") + layer.get_delta_weight("other")).T
        assert torch.allclose(layer(x), expected, atol=ATOL)


def test_peft_s_refusals():
    with pytest.raises(ConfigError, match="`n_frequency` should be a positive integer value but the value passed "
                                          "is 0"):
        _adapt(nn.Linear(4, 4), n_frequency=0)
    with pytest.raises(ConfigError, match="`n_frequency` should be less than or equal to the product of the input "
                                          "and output dimensions but the value passed is 17 and the product is 16"):
        _adapt(nn.Linear(4, 4), n_frequency=17)
    with pytest.raises(ConfigError, match="Wavelet family haar not supported. Supported wavelet families are"):
        WaveFTConfig(wavelet_family="haar")
    with pytest.raises(ConfigError, match="Wavelet family coif4 not supported. deltatune computes"):
        WaveFTConfig(wavelet_family="coif4")
    assert WaveFTConfig(wavelet_family="coif4", use_idwt=False).wavelet_family == "coif4"  # no filter needed
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
        WaveFTConfig(target_modules=".*q", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="When `layers_pattern` is specified, `layers_to_transform` must also be "
                                          "specified."):
        WaveFTConfig(layers_pattern="layers")
    assert set(SUPPORTED_FAMILIES) >= set(PEFT_HAS)


def _n_frequencies(model: nn.Module) -> dict[str, int]:
    return {name: m.waveft_n_frequency["default"] for name, m in model.named_modules()
            if hasattr(m, "waveft_n_frequency")}


@pytest.mark.parametrize("extra", [{"n_frequency_pattern": {"v_proj": 40, r"layers\.1\.self_attn\.q_proj": 7}},
                                   {"proportional_parameters": True,
                                    "target_modules": ["q_proj", "v_proj", "down_proj"]}])
def test_frequency_counts_per_layer_are_peft_s(extra):
    ours = get_peft_model(tiny_llama(), WaveFTConfig(n_frequency=100, task_type="CAUSAL_LM", **extra))
    theirs = peft.get_peft_model(tiny_llama(), peft.WaveFTConfig(n_frequency=100, task_type="CAUSAL_LM", **extra))
    counts = _n_frequencies(ours)
    assert counts == _n_frequencies(theirs) and len(set(counts.values())) > 1


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_cross_with_peft(direction, tmp_path):
    inputs = make_inputs("llama")
    config = {"n_frequency": 64, "n_frequency_pattern": {"q_proj": 100}, "wavelet_family": "db2",
              "init_weights": False, "random_loc_seed": 3, "task_type": "CAUSAL_LM"}
    torch.manual_seed(4)
    if direction == "peft_to_ours":
        source = peft.get_peft_model(tiny_llama(), peft.WaveFTConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert isinstance(loaded.base_model, WaveFTModel)
    else:
        source = get_peft_model(tiny_llama(), WaveFTConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert q.waveft_spectrum["default"].shape == (100,)
    with torch.no_grad():
        assert torch.allclose(output(loaded, inputs), output(source, inputs), atol=1e-4)
        assert (output(loaded, inputs) - output(tiny_llama(), inputs)).abs().max() > 1e-3


def test_gpt2_conv1d_model_contract(tmp_path):
    def config():
        return WaveFTConfig(n_frequency=200, wavelet_family="sym2")  # PEFT's GPT-2 target: mlp.c_proj (Conv1D)

    check_model_contract(tiny_gpt2, "gpt2", config, "waveft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", WaveFTConfig(n_frequency=64, task_type="CAUSAL_LM"),
                       WaveFTConfig(n_frequency=32, wavelet_family="db2", random_loc_seed=1, task_type="CAUSAL_LM"),
                       tmp_path)



def test_config_fields_and_defaults_are_peft_s():
    def fields(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    assert fields(WaveFTConfig) == fields(peft.WaveFTConfig)
