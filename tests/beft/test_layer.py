"""BEFT layers against ``y = W x + b + β`` (the paper's formula), equality with peft's layer on the same tensors,
identity at init, merge/unmerge (into a bias-free layer too, beyond PEFT), two adapters, mixed-adapter batches,
a 4-bit base, PEFT's config and default targets, and the model-level contract on GPT-2 (``Conv1D``, beyond PEFT).
Files both ways with peft: the contract's row (tests/support/contract.py)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import output, perturb_trainable, tiny_gpt2, tiny_llama

from deltatune import BeftConfig, get_peft_model
from deltatune.beft import BEFT_TARGETS
from deltatune.errors import ConfigError

ATOL = 1e-5


def _adapt(kind: str = "linear", perturb: bool = True, **config):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, BeftConfig(target_modules=["layer"], **config)).eval()
    if perturb:
        perturb_trainable(pm, std=0.3)
    return pm, pm.base_model.model.layer, x


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
def test_matches_reference_and_merges_into_the_bias(kind):
    pm, layer, x = _adapt(kind)
    beta = layer.beft_bias["default"].detach()
    assert beta.shape == (1, layer.out_features)
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, base_output(layer, x) + beta.flatten(), atol=ATOL, rtol=1e-5)
    had_bias = layer.base_layer.bias is not None
    b0 = layer.base_layer.bias.detach().clone() if had_bias else torch.zeros(layer.out_features)
    pm.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, b0 + beta.flatten(), atol=ATOL, rtol=0)
    assert not layer.base_layer.bias.requires_grad
    pm.unmerge_adapter()
    assert (layer.base_layer.bias is not None) == had_bias  # a bias the merge created is gone again
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)


def test_identity_at_init_and_random_init():
    pm, layer, x = _adapt(perturb=False)
    assert torch.equal(layer.beft_bias["default"], torch.zeros(1, 12))
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    pm, layer, x = _adapt(perturb=False, init_weights=False)
    assert layer.beft_bias["default"].std() > 0.3
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_peft_layer_on_the_same_tensors(dtype):
    """Same base, same ``β``: equal outputs, and the same bias merged and unmerged (``β`` kept fp32 in both)."""
    atol = ATOL if dtype == torch.float32 else 1e-2
    model, x = layer_and_input("linear")
    pm = get_peft_model(model.to(dtype), BeftConfig(target_modules=["layer"], init_weights=False)).eval()
    layer, x = pm.base_model.model.layer, x.to(dtype)
    assert layer.beft_bias["default"].dtype == torch.float32
    model, _ = layer_and_input("linear")
    theirs = peft.get_peft_model(model.to(dtype), peft.BeftConfig(target_modules=["layer"])).eval()
    their_layer = theirs.base_model.model.layer
    with torch.no_grad():
        their_layer.beft_bias["default"].copy_(layer.beft_bias["default"])
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=atol)
    pm.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, their_layer.base_layer.bias, atol=atol, rtol=0)
    pm.unmerge_adapter()
    theirs.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, their_layer.base_layer.bias, atol=atol, rtol=0)
    assert repr(layer).startswith(repr(their_layer).split("(")[0] + "(")  # PEFT's: Linear


def test_two_active_adapters_add_and_a_mixed_batch_runs_each_row_through_its_own():
    pm, layer, x = _adapt()
    pm.add_adapter("other", BeftConfig(target_modules=["layer"], init_weights=False))
    betas = {n: layer.beft_bias[n].detach().flatten() for n in ("default", "other")}
    layer.set_adapter(["default", "other"])
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, base_output(layer, x) + betas["default"] + betas["other"], atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)
    pm.set_adapter("default")
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        rows = pm(x, adapter_names=names)
    for row, name in enumerate(names):
        want = base_output(layer, x[row : row + 1]) + betas.get(name, torch.zeros(12))
        torch.testing.assert_close(rows[row : row + 1], want, atol=ATOL, rtol=1e-5)


def test_over_a_4bit_base_equals_peft_and_merging_leaves_the_weight_alone():
    """Over a bitsandbytes nf4 layer: peft's ``beft.Linear4bit`` output on the same ``β``; merging writes the bias
    only (the packed weight is not requantised); ``merge_and_unload`` gives a dense ``nn.Linear`` with the output."""
    pytest.importorskip("bitsandbytes")
    from deltatune.quantization import quantize

    model, x = layer_and_input("linear", dims=(64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize(model, "nf4")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BeftConfig(target_modules=["layer"])).eval()
        ours = get_peft_model(base, BeftConfig(target_modules=["layer"], init_weights=False)).eval()
        layer = ours.base_model.model.layer
        assert repr(layer).split("(")[0] == repr(theirs.base_model.model.layer).split("(")[0] == "Linear"
        theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".beft_" in k}, strict=False)
        got = output(ours, {"x": x})
        torch.testing.assert_close(got, output(theirs, {"x": x}), atol=ATOL, rtol=0)
        packed = layer.base_layer.weight.data.clone()
        ours.merge_adapter()
        assert torch.equal(layer.base_layer.weight.data, packed)
        torch.testing.assert_close(output(ours, {"x": x}), got, atol=ATOL, rtol=0)
        plain = ours.merge_and_unload()
    assert type(plain.layer) is torch.nn.Linear
    torch.testing.assert_close(output(plain, {"x": x}), got, atol=1e-4, rtol=1e-4)


def test_merging_into_a_bias_free_layer_where_peft_refuses():
    """PEFT refuses ("Base layer has no bias, cannot merge bias adapter default"); deltatune gives the layer a
    bias, and ``merge_and_unload`` returns a Linear with it."""
    model, x = layer_and_input("linear_nobias")
    theirs = peft.get_peft_model(model, peft.BeftConfig(target_modules=["layer"]))
    with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter default"):
        theirs.merge_adapter()
    pm, layer, x = _adapt("linear_nobias")
    got = output(pm, {"x": x})
    plain = pm.merge_and_unload()
    assert type(plain.layer) is torch.nn.Linear and plain.layer.bias is not None
    torch.testing.assert_close(output(plain, {"x": x}), got, atol=ATOL, rtol=1e-5)


def test_config_defaults_targets_and_refusals_match_peft():
    ours, theirs = BeftConfig().to_dict(), peft.BeftConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key
    assert BEFT_TARGETS == TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING
    model, _ = layer_and_input("embedding")
    with pytest.raises(ValueError):
        get_peft_model(model, BeftConfig(target_modules=["layer"]))
    with pytest.raises(ValueError, match="^Target modules {'nope'} not found in the base model"):
        get_peft_model(tiny_llama(), BeftConfig(target_modules=["nope"]))
    # PEFT 0.21.2's mixed model refuses BEFT (though its registry lists it as mixed-compatible): so does deltatune
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(tiny_llama(), peft.BeftConfig(), mixed=True)
    with pytest.raises(ConfigError) as ours:
        get_peft_model(tiny_llama(), BeftConfig(), mixed=True)
    sentence = str(theirs.value).split(" Compatible types")[0]
    assert sentence.startswith("The provided `peft_type` 'BEFT' is not compatible") and \
        str(ours.value).startswith(sentence)


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: BeftConfig(target_modules=["c_attn", "c_fc"]), "beft_", tmp_path)


def test_two_named_adapters(tmp_path):
    second = BeftConfig(init_weights=False, target_modules=["q_proj", "down_proj"])
    check_two_adapters(tiny_llama, "llama", BeftConfig(), second, tmp_path)
