"""RoAd layers against the paper's block-diagonal matrix (formed explicitly here, pair by pair), equality with
peft's layer on the same tensors, peft's files, identity at init, merge/unmerge (a singular ``R`` too), two
adapters in turn and in one mixed-adapter batch against peft's, PEFT's refusals, and the model-level contract on
GPT-2 (``Conv1D``, beyond PEFT).

The reference builds ``R: (out, out)`` entry by entry from ``road_theta``/``road_alpha`` as PEFT lays them out
(the layer never forms ``R``: it transforms the output elementwise), and checks ``y = R (W x + b)``.
"""

from __future__ import annotations

import copy
import math
import warnings

import peft
import pytest
import torch
from support.family_checks import check_model_contract
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import RoadConfig, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
VARIANTS = ("road_1", "road_2", "road_4")


def _adapt(kind: str = "linear", perturb: bool = True, **config):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, RoadConfig(target_modules=["layer"], **{"group_size": 4, **config})).eval()
    if perturb:
        perturb_trainable(pm, std=0.3)
    return pm, pm.base_model.model.layer, x


def _reference_r(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor, out: int) -> torch.Tensor:
    """``R: (out, out)`` in float64: feature ``p = k g + i`` paired with ``q = p + g/2`` (``i < g/2``) through
    ``[[a_p, −s_p], [s_q, a_q]]``, with ``a = α cos θ`` and ``s = α sin θ`` read per variant."""
    theta, alpha = theta.detach().double(), alpha.detach().double()
    r = torch.zeros(out, out, dtype=torch.float64)
    for k in range(out // g):
        for i in range(g // 2):
            p, q = k * g + i, k * g + g // 2 + i
            coef = {}
            for j in (p, q):
                if variant == "road_1":  # one (θ, α) per pair: entry k·g/2 + i
                    t = al = k * (g // 2) + i
                    coef[j] = (alpha[al] * math.cos(theta[t]), alpha[al] * math.sin(theta[t]))
                elif variant == "road_2":  # one per feature
                    coef[j] = (alpha[j] * math.cos(theta[j]), alpha[j] * math.sin(theta[j]))
                else:  # road_4: group k holds 2g entries, the first g for a, the next g for s
                    local = j - k * g
                    ia, is_ = 2 * g * k + local, 2 * g * k + g + local
                    coef[j] = (alpha[ia] * math.cos(theta[ia]), alpha[is_] * math.sin(theta[is_]))
            r[p, p], r[p, q] = coef[p][0], -coef[p][1]
            r[q, q], r[q, p] = coef[q][0], coef[q][1]
    return r


def _reference_output(layer, x: torch.Tensor, names=("default",)) -> torch.Tensor:
    """``R_n ⋯ R_1 (W x + b)`` in float64, cast back."""
    h = base_output(layer, x).double()
    for name in names:
        r = _reference_r(layer.variant[name], layer.group_size[name], layer.road_theta[name],
                         layer.road_alpha[name], h.shape[-1])
        h = h @ r.T
    return h.float()


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_and_merges(kind, variant):
    pm, layer, x = _adapt(kind, variant=variant)
    expected = _reference_output(layer, x)
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone()
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)
    if bias is not None:  # the merge rotated the bias (R b) and the unmerge turned it back
        torch.testing.assert_close(layer.base_layer.bias, bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_at_init_and_shapes(variant):
    pm, layer, x = _adapt(perturb=False, variant=variant, group_size=6)
    size = {"road_1": 6, "road_2": 12, "road_4": 24}[variant]  # out = 12
    assert layer.road_theta["default"].shape == layer.road_alpha["default"].shape == (size,)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=ATOL, rtol=0)
    pm, layer, x = _adapt(perturb=False, variant=variant, init_weights=False)
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-2
    alpha = layer.road_alpha["default"]
    assert abs(alpha.mean().item() - 1) < 0.6 and layer.road_theta["default"].std().item() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_peft_layer_on_the_same_tensors(variant, dtype):
    """Same base, same tensors: equal outputs, merged and unmerged weights, as peft's layer (over a bf16 base
    too: both keep θ, α in fp32; peft multiplies by ``R`` in bf16, deltatune transforms in fp32, so bf16's
    rounding apart)."""
    atol = ATOL if dtype == torch.float32 else 3e-2
    model, x = layer_and_input("linear")
    pm = get_peft_model(model.to(dtype), RoadConfig(target_modules=["layer"], variant=variant, group_size=4)).eval()
    perturb_trainable(pm, std=0.3)
    layer, x = pm.base_model.model.layer, x.to(dtype)
    assert layer.road_theta["default"].dtype == torch.float32
    model, _ = layer_and_input("linear")
    theirs = peft.get_peft_model(model.to(dtype), peft.RoadConfig(target_modules=["layer"], variant=variant,
                                                                  group_size=4)).eval()
    their_layer = theirs.base_model.model.layer
    with torch.no_grad():
        for name in ("road_theta", "road_alpha"):
            getattr(their_layer, name)["default"].copy_(getattr(layer, name)["default"])
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=atol)
    torch.testing.assert_close(layer.base_layer.bias, their_layer.base_layer.bias, atol=atol, rtol=1e-5)
    assert repr(layer).startswith(repr(their_layer).split("(")[0] + "(")  # road.Linear


def test_mixed_batch_matches_peft():
    """One base pass, each row through its own adapter (two group sizes, ``"__base__"`` rows): peft's rows."""
    def build(lib):
        model, x = layer_and_input("linear")
        pm = lib.get_peft_model(model, lib.RoadConfig(target_modules=["layer"], group_size=4, init_weights=False))
        pm.add_adapter("other", lib.RoadConfig(target_modules=["layer"], variant="road_4", group_size=6,
                                               init_weights=False))
        return pm.eval(), x

    ours, x = build(deltatune)
    theirs, _ = build(peft)
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            value.copy_(theirs.state_dict()[key])
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        got, expected = ours(x, adapter_names=names), theirs(x, adapter_names=names)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    layer = ours.base_model.model.layer
    for row, name in enumerate(names):
        want = base_output(layer, x[row : row + 1])
        if name != "__base__":
            want = _reference_output(layer, x[row : row + 1], (name,))
        torch.testing.assert_close(got[row : row + 1], want, atol=ATOL, rtol=1e-5)


def test_peft_files_of_another_variant_load(tmp_path):
    """peft's road_4 file (θ, α of 2·out entries) loads into deltatune with its logits (the contract's row crosses
    the default road_1 both ways; the files' keys and the config's fields are the same for every variant)."""
    inputs = make_inputs("llama")
    config = {"variant": "road_4", "group_size": 8, "init_weights": False, "target_modules": ["q_proj", "o_proj"]}
    theirs = peft.get_peft_model(tiny_llama(), peft.RoadConfig(task_type="CAUSAL_LM", **config))
    theirs.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].variant == "road_4"
    torch.testing.assert_close(output(loaded, inputs), output(theirs.eval(), inputs), atol=ATOL, rtol=0)


def test_two_active_adapters_apply_in_turn():
    pm, layer, x = _adapt(variant="road_2")
    pm.add_adapter("other", RoadConfig(target_modules=["layer"], variant="road_1", group_size=12, init_weights=False))
    layer.set_adapter(["default", "other"])
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, _reference_output(layer, x, ("default", "other")), atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)


def test_singular_rotation_merges_and_unmerges_exactly():
    """α = 0 on a pair makes ``R`` singular (peft's unmerge cannot invert it): the pre-merge weight and bias come
    back bit for bit; ``safe_merge`` leaves nothing cached behind."""
    pm, layer, x = _adapt(variant="road_2")
    with torch.no_grad():
        layer.road_alpha["default"][[0, 2]] = 0.0  # features 0 and 2 of the first pair (0, 2) of group 0
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, _reference_output(layer, x), atol=ATOL, rtol=1e-5)
    pm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(output(pm, {"x": x}), got, atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert not layer._merge_cache


def test_refusals_begin_with_peft_s_sentence():
    for kwargs in ({"variant": "road_3"}, {"group_size": 5}, {"group_size": 0}):
        with pytest.raises(ValueError) as theirs:
            peft.RoadConfig(**kwargs)
        with pytest.raises(ConfigError) as ours:
            RoadConfig(**kwargs)
        assert str(ours.value).startswith(str(theirs.value))
    model, _ = layer_and_input("linear")  # out_features 12
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(model, peft.RoadConfig(target_modules=["layer"], group_size=8))
    model, _ = layer_and_input("linear")
    with pytest.raises(ConfigError) as ours:
        get_peft_model(model, RoadConfig(target_modules=["layer"], group_size=8))
    assert str(ours.value).startswith(str(theirs.value))
    model, _ = layer_and_input("conv2d")
    with pytest.raises(ValueError):
        get_peft_model(model, RoadConfig(target_modules=["layer"], group_size=2))
    with pytest.raises(ValueError, match="^Target modules {'nope'} not found in the base model"):
        get_peft_model(tiny_llama(), RoadConfig(target_modules=["nope"], group_size=16))  # a config without
        # layers_to_transform (PEFT's fields) still gets the message naming the closest modules
    # PEFT 0.21.2's mixed model refuses RoAd (though its registry lists it as mixed-compatible): so does deltatune
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(tiny_llama(), peft.RoadConfig(target_modules=["q_proj"], group_size=16), mixed=True)
    with pytest.raises(ConfigError) as ours:
        get_peft_model(tiny_llama(), RoadConfig(target_modules=["q_proj"], group_size=16), mixed=True)
    sentence = str(theirs.value).split(" Compatible types")[0]
    assert sentence.startswith("The provided `peft_type` 'ROAD' is not compatible") and \
        str(ours.value).startswith(sentence)


def test_config_fields_and_defaults_match_peft():
    ours, theirs = RoadConfig().to_dict(), peft.RoadConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: RoadConfig(group_size=16, target_modules=["c_attn", "c_fc"]),
                         "road_", tmp_path)


def test_over_a_4bit_base_equals_peft_bnb_layer_and_unloads_exactly():
    """QLoRA-style: RoAd over a bitsandbytes nf4 layer gives peft's ``road.Linear4bit`` output on the same tensors
    (the base runs quantised, its output is transformed); ``merge_and_unload`` returns a dense ``nn.Linear``
    (``R W`` of the dequantised weight, ``R b``) with the adapted output."""
    pytest.importorskip("bitsandbytes")
    from deltatune.quantization import quantize

    model, x = layer_and_input("linear", dims=(64, 32))
    config = {"variant": "road_2", "group_size": 16, "init_weights": False, "target_modules": ["layer"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize(model, "nf4")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**config)).eval()
        ours = get_peft_model(base, RoadConfig(**config)).eval()
        layer = ours.base_model.model.layer
        assert repr(layer).startswith("road.Linear4bit")
        theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".road_" in k}, strict=False)
        got = output(ours, {"x": x})
        torch.testing.assert_close(got, output(theirs, {"x": x}), atol=ATOL, rtol=0)
        plain = ours.merge_and_unload()
    assert type(plain.layer) is nn.Linear
    torch.testing.assert_close(output(plain, {"x": x}), got, atol=1e-4, rtol=1e-4)
