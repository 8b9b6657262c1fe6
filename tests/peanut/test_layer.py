"""PEANuT layers against the paper's network run column by column (Linear, Conv1D, Conv1d/2d), against peft's own
layer on the same tensors, PEFT's initialisation under one seed, identity at init, merge/unmerge against the kept
``W0``, several adapters, PEFT's refusals, files both ways with peft, and the model-level contract (GPT-2's
``Conv1D``, two named adapters on the tiny Llama).

The reference applies the network to each column ``w = W0[:, j]`` (a vector of length ``out``) on its own, in
float64, ``ΔW[:, j] = s · B dec(enc(σ(A w)))``, not with the layer's batched matmuls.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from deltatune import PeanutConfig, PeanutLayer, PeanutModel, PeftModel, get_peft_model
from deltatune.cli.inspect import describe
from deltatune.errors import ConfigError, MergeError

ATOL = 1e-5


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config = {"r": 3, "depth": 2, "act_fn": "gelu", "scaling": 0.5, "init_weights": False, **config}
    pm = get_peft_model(model, PeanutConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _reference_delta(layer: PeanutLayer, name: str = "default") -> torch.Tensor:
    """``ΔW`` in the layout ``F.linear``/the conv read (``(out, in, *k)``), one column of ``W0`` at a time."""
    base = layer.base_layer
    w0 = (base.weight.T if isinstance(base, Conv1D) else base.weight).detach().double()
    sigma = ACT2FN[layer.act_fn[name]]
    a = layer.peanut_A[name].weight.detach().double()
    b = layer.peanut_B[name].weight.detach().double()
    encoders = [e.weight.detach().double() for e in layer.peanut_encoders[name]]
    decoders = [d.weight.detach().double() for d in layer.peanut_decoders[name]]
    columns = w0.reshape(w0.shape[0], -1)
    delta = torch.zeros_like(columns)
    for j in range(columns.shape[1]):
        h = sigma(a @ columns[:, j])  # (r,)
        skips = []
        for e in encoders:
            skips.append(h)
            h = sigma(e @ h)
        for i, d in enumerate(decoders):
            h = sigma(d @ h) + skips[len(decoders) - 1 - i]
        delta[:, j] = layer.scaling[name] * (b @ h)
    return delta.reshape(w0.shape).float()


@pytest.mark.parametrize("kind,depth,act", [("linear", 0, "relu"), ("linear", 2, "gelu"), ("conv1D", 1, "silu"),
                                            ("conv1d", 1, "tanh"), ("conv2d", 2, "relu")])
def test_matches_reference_and_merges(kind, depth, act):
    pm, layer, x = _adapt(kind, depth=depth, act_fn=act)
    assert isinstance(layer, PeanutLayer) and isinstance(pm.base_model, PeanutModel)
    out = layer.delta_shape[0]
    assert layer.peanut_A["default"].weight.shape == (3, out) and layer.peanut_B["default"].weight.shape == (out, 3)
    assert len(layer.peanut_encoders["default"]) == len(layer.peanut_decoders["default"]) == depth
    delta = _reference_delta(layer)
    expected = base_output(layer, x, delta)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    stored = delta.T if kind == "conv1D" else delta
    torch.testing.assert_close(layer.get_delta_weight("default"), stored, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    plain = pm.merge_and_unload()
    assert type(plain.layer) is type(layer.base_layer)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("depth,act,kind", [(0, "relu", "linear"), (2, "gelu", "linear_nobias")])
def test_equals_peft_layer_on_the_same_tensors_and_draws_peft_s_init(depth, act, kind):
    """Same seed, same draws: both libraries create the adapter in the same order, so no copying is needed."""
    config = {"target_modules": ["layer"], "r": 4, "depth": depth, "act_fn": act, "scaling": 2.0,
              "init_weights": False}
    ours_base, _ = layer_and_input(kind)
    torch.manual_seed(5)
    pm = get_peft_model(ours_base, PeanutConfig(**config)).eval()
    model, x = layer_and_input(kind)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(model, peft.PeanutConfig(**config)).eval()
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    assert layer.state_dict().keys() == their_layer.state_dict().keys()
    for key, value in their_layer.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL, unmerge_atol=0)


def test_identity_at_init_and_gradients():
    pm, layer, x = _adapt("linear", init_weights=True)
    assert not layer.peanut_B["default"].weight.any() and layer.peanut_A["default"].weight.any()
    assert torch.equal(output(pm, {"x": x}), base_output(layer, x))
    perturb_trainable(pm, std=0.2)
    pm.train()
    pm(x=x).square().sum().backward()
    for name, p in pm.named_parameters():
        assert p.requires_grad == ("peanut_" in name), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.base_layer.weight.grad is None


def test_adapter_stays_float32_over_a_half_precision_base():
    layer = PeanutLayer(nn.Linear(16, 12).to(torch.bfloat16))
    layer.update_layer("default", r=3, depth=1, init_weights=False)
    assert layer.peanut_encoders["default"][0].weight.dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    want = layer.base_layer(x).float() + x.float() @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x).float(), want, atol=0.05, rtol=0.02)


def test_two_active_adapters_and_merges_against_the_original_weight():
    """``W0 + ΔW_1(W0) + ΔW_2(W0)`` active together and merged one at a time (each from the unmerged ``W0``, as
    PEFT); unmerging gives ``W0`` back bit for bit."""
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", PeanutConfig(target_modules=["layer"], r=2, depth=0, init_weights=False))
    layer.set_adapter(["default", "other"])
    deltas = _reference_delta(layer, "default") + _reference_delta(layer, "other")
    expected = base_output(layer, x, deltas)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["default"])
    layer.merge(adapter_names=["other"])
    torch.testing.assert_close(layer.base_layer.weight, w0 + deltas, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0) and layer._weight_before_merge is None


def test_safe_merge_refuses_non_finite_and_unmerge_without_w0_refuses():
    pm, layer, x = _adapt("linear")
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.peanut_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged and layer._weight_before_merge is None
    layer.merged_adapters.append("default")  # marked merged behind merge()'s back: no W0 was kept
    with pytest.raises(MergeError, match="the base weight before the merge was not kept"):
        layer.unmerge()


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = PeanutConfig().to_dict(), peft.PeanutConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "PEANUT" and PeanutConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "`r` must be a positive integer."),
    ({"depth": -1}, "`depth` can only be a non-negative integer."),
    ({"act_fn": "nope"}, "Unsupported `act_fn`: nope. Must be one of"),
    ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also be specified."),
])
def test_refusals_begin_with_peft_s_sentence(bad, match):
    with pytest.raises(ValueError, match=match):
        peft.PeanutConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        PeanutConfig(**bad)


def test_unsupported_layer_type_is_refused():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(Holder(nn.Embedding(10, 4)), PeanutConfig(target_modules=["layer"]))


# ---- whole models and files ----------------------------------------------------------------------

def test_files_cross_both_ways_with_peft(tmp_path):
    """Encoder/decoder stacks (``peanut_encoders.<i>.weight`` in files), ``act_fn`` and ``scaling`` cross."""
    inputs = make_inputs("llama")
    config = {"r": 4, "depth": 2, "act_fn": "silu", "scaling": 0.5, "task_type": "CAUSAL_LM"}
    ours = get_peft_model(tiny_llama(), PeanutConfig(**config))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    info = describe(str(tmp_path / "ours"))
    assert info["ranks_in_file"] == {4: 4} and info["adapted_modules"] == 4  # q_proj, v_proj of 2 blocks
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

    made = peft.get_peft_model(tiny_llama(), peft.PeanutConfig(**config))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    assert isinstance(loaded.base_model, PeanutModel)
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
    merged = copy.deepcopy(loaded).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), output(made.merge_and_unload(), inputs), atol=ATOL, rtol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_model_contract(tiny_gpt2, "gpt2", lambda: PeanutConfig(r=4, depth=1, target_modules=["c_attn", "c_fc"]),
                             "peanut_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", PeanutConfig(r=2, task_type="CAUSAL_LM"),
                       PeanutConfig(r=4, depth=1, act_fn="gelu", target_modules=["q_proj", "down_proj"]), tmp_path)
