"""DeLoRA layers against the paper's formula written with ``einsum`` (Linear, GPT-2's Conv1D), against peft's layer on
the same tensors, the norm bound ``‖ΔW‖_F <= λ · max_j ‖W[:, j]‖``, identity at init, dropout, merge/unmerge, rank
and lambda patterns, PEFT's refusals, files both ways with peft, and the model contract on GPT-2 and two adapters.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import DeloraConfig, DeloraLayer, DeloraModel, PeftModel, get_peft_model, get_peft_model_state_dict
from deltatune.errors import ConfigError

ATOL = 1e-5


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config.setdefault("r", 3)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, DeloraConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _delta(layer: DeloraLayer, name: str = "default") -> torch.Tensor:
    """``ΔW: (out, in) = Σ_i (λ / r) b_i a_iᵀ / (‖a_i‖ ‖b_i‖) · diag(w)``, w the base weight's column norms."""
    a, b, lam = layer.delora_A[name], layer.delora_B[name], layer.delora_lambda[name]
    scale = lam / layer.r[name] / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
    return torch.einsum("i,oi,ij,j->oj", scale, b, a, layer.delora_w_norm[name])


def _w(layer: DeloraLayer) -> torch.Tensor:
    base = layer.base_layer
    return base.weight.T if isinstance(base, Conv1D) else base.weight


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_matches_reference_and_norm_bound(kind):
    pm, layer, x = _adapt(kind, delora_lambda=3)
    torch.testing.assert_close(layer.delora_w_norm["default"], _w(layer).norm(dim=0))
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, _delta(layer)), atol=ATOL, rtol=1e-5)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta.T if kind == "conv1D" else delta, _delta(layer), atol=ATOL, rtol=1e-5)
    bound = 3 * layer.delora_w_norm["default"].max()
    assert _delta(layer).norm() <= bound + 1e-5
    assert_merge_round_trip(pm, layer, x, base_output(layer, x, _delta(layer)), atol=ATOL)


def test_identity_at_init_and_lambda_trains():
    pm, layer, x = _adapt("linear", init_weights=True)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    pm.train()
    pm(x).pow(2).mean().backward()
    assert layer.delora_B["default"].grad.abs().sum() > 0 and layer.delora_lambda["default"].requires_grad


def test_equals_peft_layer_on_the_same_tensors():
    model, x = layer_and_input("linear")
    config = dict(target_modules=["layer"], r=3, init_weights=False)
    pm = get_peft_model(copy.deepcopy(model), DeloraConfig(**config)).eval()
    perturb_trainable(pm, seed=2, std=0.2)
    theirs = peft.get_peft_model(model, peft.DeloraConfig(**config)).eval()
    peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(pm))
    assert_same_as_peft_layer(pm, pm.base_model.model.layer, theirs, theirs.base_model.model.layer, x, atol=ATOL)


def test_dropout_acts_on_the_adapter_input():
    pm, layer, x = _adapt("linear", module_dropout=0.5)
    pm.train()
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    want = base_output(layer, x) + F.linear(F.dropout(x, 0.5, training=True), _delta(layer))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_rank_and_lambda_patterns():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pm = get_peft_model(model, DeloraConfig(target_modules=["0", "1"], r=4, rank_pattern={"1": 2},
                                            lambda_pattern={"0": 7}))
    first, second = pm.base_model.model[0], pm.base_model.model[1]
    assert first.delora_A["default"].shape == (4, 8) and second.delora_B["default"].shape == (8, 2)
    assert first.delora_lambda["default"].item() == 7 and second.delora_lambda["default"].item() == 15


# ---- config and PEFT's refusals ------------------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = DeloraConfig().to_dict(), peft.DeloraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "DELORA" and DeloraConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}
    assert DeloraModel.prefix == peft.PEFT_TYPE_TO_TUNER_MAPPING["DELORA"].prefix == "delora_"


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "`r` must be a positive integer; got 0."),
    ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also be"),
    ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used when `target_modules` "
                                                         "is a str."),
    ({"module_dropout": 1.0}, "module_dropout"), ({"bias": "lora_only"}, "delora_only"),
])
def test_bad_config_is_a_clear_error_with_pefts_sentence(bad, match):
    with pytest.raises(ConfigError, match=match):
        DeloraConfig(**bad)


def test_zero_rank_from_a_layer_refused_with_pefts_sentence():
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        DeloraLayer(nn.Linear(4, 4)).update_layer("default", r=0, delora_lambda=15)


# ---- whole models and files ------------------------------------------------------------------------------------

def test_gpt2_contract(tmp_path):
    """GPT-2's ``Conv1D`` (PEFT adapts ``nn.Linear`` only; the math holds on ``Wᵀ``)."""
    check_model_contract(tiny_gpt2, "gpt2", lambda: DeloraConfig(r=4, target_modules=["c_attn", "c_fc"]), "delora_",
                         tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", DeloraConfig(r=2),
                       DeloraConfig(r=4, delora_lambda=5, target_modules=["q_proj", "down_proj"]), tmp_path)


def test_files_cross_both_ways_with_peft_after_a_merge_changed_the_weight(tmp_path):
    """The saved column norms ``w`` are those of the weight when the adapter was created: a file made over a model
    whose weight was changed since (another adapter merged) still gives peft's numbers."""
    inputs = make_inputs("llama")
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    made = peft.get_peft_model(tiny_llama(), peft.DeloraConfig(**config, init_weights=False))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=1e-6, rtol=1e-5)
    loaded.merge_adapter()
    loaded.load_adapter(tmp_path / "theirs", adapter_name="again")  # w measured on the merged weight, then loaded
    loaded.unmerge_adapter()
    loaded.set_adapter("again")
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=1e-6, rtol=1e-5)
