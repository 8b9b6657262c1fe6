"""DEFT layers against the formula ``W' = (I - P_proj) W + Q_P (s R)`` (the ``(out, out)`` projector formed in float64
here, unlike the layer), against peft's own layer for each setting (same seed: same tensors, output, merged weight),
identity at init, several adapters merged in one call or two (both equal their forward), unmerge restoring the
weight, PEFT's refusals, files both ways with peft, and the model-level contract (GPT-2's ``Conv1D``, two named
adapters on the tiny Llama).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, built_like_peft, layer_and_input
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import DeftConfig, DeftLayer, DeftLinear, DeftModel, PeftModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
# (decomposition_method, para, alpha, init_weights): each value of each setting at least once
SETTINGS = [("relu", False, None, False), ("qr", False, None, False), ("relu", True, None, False),
            ("qr", False, 8, True), ("relu", False, 2, False), ("qr", True, None, True)]


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config = {"r": 3, "init_weights": False, **config}
    pm = get_peft_model(model, DeftConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _effective(layer: DeftLayer, names=("default",)) -> torch.Tensor:
    """``W + Σ_i [(I - P_proj,i) W + Q_i s_i R_i - W]``: ``(out, in)``, every term against the unmerged ``W``."""
    base = layer.base_layer
    w0 = (base.weight.T if isinstance(base, Conv1D) else base.weight).detach().double()
    w = w0.clone()
    out = w0.shape[0]
    for name in names:
        P = layer.deft_P[name].detach().double()
        if layer.deft_decomposition[name] == "qr":
            Q, _ = torch.linalg.qr(P)
            proj, q = Q @ Q.T, Q
        else:
            proj, q = P @ torch.relu(P).T, P
        adapted = (torch.eye(out, dtype=torch.float64) - proj) @ w0
        if not layer.deft_para[name]:
            adapted = adapted + q @ (layer.deft_R[name].detach().double() * layer.deft_scaling[name])
        w = w + adapted - w0
    return w.float()


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
@pytest.mark.parametrize("method,para,alpha", [("relu", False, None), ("qr", False, 6), ("qr", True, None)])
def test_matches_the_formula_and_merges(kind, method, para, alpha):
    pm, layer, x = _adapt(kind, decomposition_method=method, para=para, alpha=alpha)
    assert isinstance(layer, DeftLinear) and isinstance(pm.base_model, DeftModel)
    assert layer.deft_scaling["default"] == (alpha / 3 if alpha else 1.0)
    w = _effective(layer)
    expected = F.linear(x, w, layer.base_layer.bias)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    pm.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w.T if kind == "conv1D" else w, atol=1e-6, rtol=1e-5)
    pm.unmerge_adapter()
    plain = pm.merge_and_unload()
    assert type(plain.layer) is type(layer.base_layer)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


def test_equals_peft_layer_for_each_setting():
    """Under one seed both libraries draw the same ``P`` and ``R`` under the same names, and give the same output,
    merged weight and unmerged weight."""
    x = torch.randn(3, 6)
    for method, para, alpha, init in SETTINGS:
        config = {"target_modules": ["layer"], "r": 3, "decomposition_method": method, "para": para,
                  "alpha": alpha, "init_weights": init}
        torch.manual_seed(0)
        ours, theirs, layer, their_layer = built_like_peft(
            Holder(nn.Linear(6, 5)), DeftConfig(**config), peft.DeftConfig(**config), config)
        if init:  # both start from the identity; move R so that the test sees the injection too
            perturb_trainable(ours, seed=3, std=0.2)
            their_layer.load_state_dict(layer.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=1e-5, msg=str(config))
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=1e-6, rtol=1e-5)
        ours.unmerge_adapter()
        theirs.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=1e-6, rtol=1e-5)


def test_rank_is_capped_at_out_features_as_peft():
    ours = get_peft_model(Holder(nn.Linear(6, 2)), DeftConfig(target_modules=["layer"], r=8))
    theirs = peft.get_peft_model(Holder(nn.Linear(6, 2)), peft.DeftConfig(target_modules=["layer"], r=8))
    layer, their_layer = ours.base_model.model.layer, theirs.base_model.model.layer
    assert layer.deft_r == their_layer.deft_r == {"default": 2}
    assert layer.deft_P["default"].shape == their_layer.deft_P["default"].shape == (2, 2)


def test_identity_at_init_and_trainable_tensors():
    pm, layer, x = _adapt("linear", init_weights=True, alpha=4)
    torch.testing.assert_close(output(pm, {"x": x}), layer.base_layer(x), atol=1e-6, rtol=0)
    trainable = {n.split("layer.")[-1] for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"deft_P.default", "deft_R.default"}
    perturb_trainable(pm, std=0.2)
    pm.train()
    pm(x=x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters() if p.requires_grad)
    assert layer.base_layer.weight.grad is None


def test_para_trains_only_P_and_is_not_the_identity():
    pm, layer, x = _adapt("linear", para=True, init_weights=True)
    assert "default" not in layer.deft_R
    assert {n.split("layer.")[-1] for n, p in pm.named_parameters() if p.requires_grad} == {"deft_P.default"}
    assert not torch.allclose(output(pm, {"x": x}), layer.base_layer(x), atol=1e-6)


def test_dropout_acts_on_the_injection_only():
    """Training: ``y = x ((I - P_proj) W)ᵀ + b + dropout(x) Rᵀ Q_Pᵀ`` (the removal term sees the whole input)."""
    pm, layer, x = _adapt("linear", deft_dropout=0.5)
    P, R = layer.deft_P["default"].detach(), layer.deft_R["default"].detach()
    w = layer.base_layer.weight.detach()
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True)
    expected = F.linear(x, w - P @ torch.relu(P).T @ w, layer.base_layer.bias) + dropped @ R.T @ P.T
    pm.train()
    torch.manual_seed(0)
    torch.testing.assert_close(pm(x=x), expected, atol=ATOL, rtol=1e-5)
    pm.eval()
    torch.testing.assert_close(output(pm, {"x": x}), F.linear(x, _effective(layer), layer.base_layer.bias),
                               atol=ATOL, rtol=1e-5)


def test_two_adapters_active_and_merged_in_one_call_or_two():
    """``W + Σ_i ΔW_i(W)``, each term against the unmerged ``W`` whether the adapters are merged together or one
    after the other; unmerging restores ``W``."""
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", DeftConfig(target_modules=["layer"], r=2, decomposition_method="qr", init_weights=False))
    layer.set_adapter(["default", "other"])
    w = _effective(layer, ("default", "other"))
    expected = F.linear(x, w, layer.base_layer.bias)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    w0 = layer.base_layer.weight.detach().clone()
    for calls in (["default", "other"], [["default"], ["other"]]):
        for names in ([calls] if isinstance(calls[0], str) else calls):
            layer.merge(adapter_names=names)
        torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=1e-6)
        assert not layer._merge_factors


def test_safe_merge_refuses_non_finite_and_keeps_nothing():
    pm, layer, x = _adapt("linear")
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.deft_R["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged and not layer._merge_factors


def test_adapter_stays_float32_over_a_half_precision_base():
    layer = DeftLayer(nn.Linear(8, 4).to(torch.bfloat16))
    layer.update_layer("default", r=2, init_weights=True)
    assert layer.deft_P["default"].dtype == layer.deft_R["default"].dtype == torch.float32
    layer.set_adapter("default")
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = DeftConfig().to_dict(), peft.DeftConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "DEFT" and DeftConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}


def test_refusals_begin_with_peft_s_sentence():
    match = r"Unknown decomposition_method 'svd', must be one of \['qr', 'relu'\]."
    with pytest.raises(ValueError, match=match):
        peft.DeftConfig(decomposition_method="svd")
    with pytest.raises(ConfigError, match=match):
        DeftConfig(decomposition_method="svd")
    match = "`r` should be a positive integer value but the value passed is 0"
    with pytest.raises(ValueError, match=match):  # PEFT refuses it when the layer is built
        peft.get_peft_model(Holder(nn.Linear(4, 4)), peft.DeftConfig(target_modules=["layer"], r=0))
    with pytest.raises(ConfigError, match=match):
        DeftConfig(r=0)
    with pytest.raises(ValueError, match="Conv2d"):
        get_peft_model(Holder(nn.Conv2d(2, 2, 1)), DeftConfig(target_modules=["layer"]))


def test_fan_in_fan_out_follows_the_layer_with_peft_s_warning():
    config = DeftConfig(target_modules=["c_attn"], r=2)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        get_peft_model(tiny_gpt2(), config)
    assert config.fan_in_fan_out


# ---- whole models and files ----------------------------------------------------------------------

def test_files_cross_both_ways_with_peft(tmp_path):
    """GPT-2 (``Conv1D``, biases): ours loads in peft and theirs in ours, logits equal, merged too."""
    inputs = make_inputs("gpt2")
    config = {"r": 2, "target_modules": ["c_attn", "c_proj"], "decomposition_method": "qr", "alpha": 4}
    ours = get_peft_model(tiny_gpt2(), DeftConfig(**config))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

    made = peft.get_peft_model(tiny_gpt2(), peft.DeftConfig(**config, para=True))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "theirs")
    assert isinstance(loaded.base_model, DeftModel)
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
    merged = copy.deepcopy(loaded).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), output(made.merge_and_unload(), inputs), atol=ATOL, rtol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: DeftConfig(r=2, target_modules=["c_attn"]), "deft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", DeftConfig(r=2, task_type="CAUSAL_LM"),
                       DeftConfig(r=4, decomposition_method="qr", target_modules=["q_proj", "down_proj"]), tmp_path)
