"""HRA layers against the paper's product of Householder matrices (formed explicitly here), equality with peft's
layers on the same tensors, files both ways with peft, identity at init, merge/unmerge, two adapters in turn,
PEFT's refusals, and the model-level contract on GPT-2 (``Conv1D``).

The reference builds ``R = Π_i (I − 2 u_i u_iᵀ / ‖u_i‖²)`` as ``(d, d)`` matrices, and for Gram-Schmidt
``R = I − 2 Q Qᵀ`` with ``Q`` from a QR factorisation (the layer never forms ``R`` and orthonormalises by hand).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import HRAConfig, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5


def _adapt(kind: str, perturb: bool = True, **config):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, HRAConfig(target_modules=["layer"], **{"r": 4, **config})).eval()
    if perturb:
        perturb_trainable(pm, std=0.2)
    return pm, pm.base_model.model.layer, x


def _reference_r(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``R: (d, d)`` from ``u: (d, r)``, by the paper's formula."""
    d = u.shape[0]
    if apply_gs:
        q, _ = torch.linalg.qr(u.double())
        return torch.eye(d, dtype=torch.float64) - 2 * q @ q.T
    r = torch.eye(d, dtype=torch.float64)
    for i in range(u.shape[1]):
        v = u[:, i : i + 1].double()
        r = r @ (torch.eye(d, dtype=torch.float64) - 2 * v @ v.T / (v.T @ v))
    return r


def _reference_extra(layer, names=("default",)) -> torch.Tensor:
    """``W R − W`` in the layout ``base_output`` reads (``(out, in)`` for ``Conv1D``)."""
    base = layer.base_layer
    w = base.weight.detach().double()
    w = w.T if isinstance(base, Conv1D) else w
    rows = w.reshape(w.shape[0], -1)
    for name in names:
        rows = rows @ _reference_r(layer.hra_u[name].detach(), layer.hra_apply_GS[name])
    return (rows.reshape(w.shape) - w).float()


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d", "conv2d_1x1"])
@pytest.mark.parametrize("apply_GS", [False, True], ids=["chain", "gs"])
def test_matches_reference_and_merges(kind, apply_GS):
    pm, layer, x = _adapt(kind, apply_GS=apply_GS, init_weights=not apply_GS)  # GS: see the warning test
    expected = base_output(layer, x, _reference_extra(layer))
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d"])
def test_identity_at_init_and_shapes(kind):
    pm, layer, x = _adapt(kind, perturb=False, r=6)
    d = 16 if kind != "conv2d" else 3 * 9
    assert layer.hra_u["default"].shape == (d, 6)
    u = layer.hra_u["default"]
    torch.testing.assert_close(u[:, 0::2], u[:, 1::2])  # equal pairs
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=ATOL, rtol=1e-5)


def test_odd_r_warns_and_random_init_is_not_the_identity():
    with pytest.warns(UserWarning, match="The symmetric initialization can NOT be performed when r is odd!"):
        pm, layer, x = _adapt("linear", perturb=False, r=3)
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-3
    pm, layer, x = _adapt("linear", perturb=False, init_weights=False)
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-3


def test_gram_schmidt_with_the_symmetric_init_warns():
    """Equal pairs leave Gram-Schmidt only rounding noise (PEFT runs it silently): deltatune says so."""
    with pytest.warns(UserWarning, match="init_weights=False"):
        HRAConfig(apply_GS=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HRAConfig(apply_GS=True, init_weights=False)
        HRAConfig(apply_GS=False)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("apply_GS", [False, True], ids=["chain", "gs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_peft_layer_on_the_same_tensors(kind, apply_GS, dtype):
    """Same base, same ``hra_u``: equal outputs and merged weights (over a bf16 base too: both keep ``hra_u`` in
    fp32, compute ``W R`` there and cast the output back)."""
    model, x = layer_and_input(kind)
    pm = get_peft_model(model.to(dtype), HRAConfig(target_modules=["layer"], r=4, apply_GS=apply_GS,
                                                          init_weights=not apply_GS)).eval()
    perturb_trainable(pm, std=0.2)
    layer, x = pm.base_model.model.layer, x.to(dtype)
    assert layer.hra_u["default"].dtype == torch.float32
    model, _ = layer_and_input(kind)
    theirs = peft.get_peft_model(model.to(dtype), peft.HRAConfig(target_modules=["layer"], r=4, apply_GS=apply_GS,
                                                                              init_weights=not apply_GS))
    theirs.eval()
    their_layer = theirs.base_model.model.layer
    with torch.no_grad():
        their_layer.hra_u["default"].copy_(layer.hra_u["default"])
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL)
    assert repr(layer).startswith(repr(their_layer).split("(")[0] + "(")  # hra.HRALinear / hra.HRAConv2d


def test_files_cross_both_ways_with_peft_gram_schmidt(tmp_path):
    """The Gram-Schmidt variant (the contract's row covers the default chain)."""
    inputs = make_inputs("llama")
    config = {"r": 4, "apply_GS": True, "init_weights": False}
    ours = get_peft_model(tiny_llama(), HRAConfig(task_type="CAUSAL_LM", **config))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours.eval(), inputs), atol=ATOL, rtol=0)

    theirs = peft.get_peft_model(tiny_llama(), peft.HRAConfig(task_type="CAUSAL_LM", **config))
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    assert loaded.peft_config["default"].apply_GS is True
    torch.testing.assert_close(output(loaded, inputs), output(theirs.eval(), inputs), atol=ATOL, rtol=0)


def test_two_active_adapters_apply_in_turn():
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", HRAConfig(target_modules=["layer"], r=2, apply_GS=True, init_weights=False))
    layer.set_adapter(["default", "other"])
    expected = base_output(layer, x, _reference_extra(layer, ("default", "other")))
    got = output(pm, {"x": x})
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, got, atol=ATOL)


def test_refusals_begin_with_peft_s_sentence():
    model, _ = layer_and_input("linear")
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(model, peft.HRAConfig(target_modules=["layer"], r=0))
    model, _ = layer_and_input("linear")
    with pytest.raises(ConfigError) as ours:
        get_peft_model(model, HRAConfig(target_modules=["layer"], r=0))
    assert str(ours.value).startswith(str(theirs.value))
    model, _ = layer_and_input("conv2d_groups")
    with pytest.raises(ValueError, match="HRA does not support Conv2d layers with groups > 1"):
        get_peft_model(model, HRAConfig(target_modules=["layer"]))
    for kwargs in ({"target_modules": "layer", "layers_to_transform": [0]},
                   {"target_modules": "layer", "layers_pattern": "h"}, {"layers_pattern": "h"}):
        with pytest.raises(ValueError) as theirs:
            peft.HRAConfig(**kwargs)
        with pytest.raises(ConfigError) as ours:
            HRAConfig(**kwargs)
        assert str(ours.value).startswith(str(theirs.value).strip())
    model, _ = layer_and_input("embedding")
    with pytest.raises(ValueError):
        get_peft_model(model, HRAConfig(target_modules=["layer"]))


def test_config_fields_and_defaults_match_peft():
    ours, theirs = HRAConfig().to_dict(), peft.HRAConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: HRAConfig(r=4, target_modules=["c_attn", "c_fc"]), "hra_",
                         tmp_path)


def test_two_named_adapters(tmp_path):
    second = HRAConfig(r=2, apply_GS=True, init_weights=False, target_modules=["q_proj", "down_proj"])
    check_two_adapters(tiny_llama, "llama", HRAConfig(r=4), second, tmp_path)
