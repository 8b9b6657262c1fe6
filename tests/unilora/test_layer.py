"""Uni-LoRA layers against a reference built entry by entry from the paper's rule, against peft's layer (the same
seeded index assignment, scales and θ; outputs, merged weights, gradients), several adapters, files both ways with
peft (indices saved or regenerated), and the model-level contract (GPT-2's Conv1D; the tiny Llama is the contract
suite's).

The reference counts how often each entry of θ is used over all the adapter's factors with a ``Counter`` and builds
``A[i, j] = θ[I_A[i, j]] / √count``, ``B`` alike, then ``ΔW = B A``; it checks the assignment is balanced.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama

import deltatune
from deltatune import PeftModel, UniLoraConfig, UniLoraLayer, UniLoraModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*fan_in_fan_out")


def _reference_deltas(pm: torch.nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """``ΔW: (out, in)`` of every layer holding ``name``, by the rule in the module docstring."""
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, UniLoraLayer) and name in m.unilora_indices_A}
    used = Counter()
    for layer in layers.values():
        used.update(layer.unilora_indices_A[name].flatten().tolist() + layer.unilora_indices_B[name].flatten().tolist())
    length = pm.peft_config[name].theta_d_length
    total = sum(used.values())
    assert set(used.values()) <= {total // length, -(-total // length)}  # balanced: floor or ceil uses each
    theta = pm.base_model.unilora_theta_d[name].detach().double()
    out = {}
    for key, layer in layers.items():
        def build(idx: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[theta[k] / used[k] ** 0.5 for k in row] for row in idx.tolist()], dtype=torch.float64)

        out[key] = (build(layer.unilora_indices_B[name]) @ build(layer.unilora_indices_A[name])).float()
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_matches_reference(kind):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, UniLoraConfig(r=3, theta_d_length=20, target_modules=["layer"])).eval()
    layer = pm.base_model.model.layer
    assert isinstance(pm.base_model, UniLoraModel) and layer.unilora_theta_d["default"] is \
        pm.base_model.unilora_theta_d["default"]
    delta = _reference_deltas(pm)["base_model.model.layer"]
    torch.testing.assert_close(layer.get_delta_weight("default"), delta.T if layer.fan_in_fan_out else delta,
                               atol=1e-6, rtol=1e-5)
    want = base_output(layer, x, delta)
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, want, ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_equals_peft_layer(kind):
    """From the same seeds every tensor and buffer is PEFT's (θ from the global seed, the assignment from
    ``proj_seed``); outputs, ΔW and θ's gradient are equal."""
    config = {"r": 2, "theta_d_length": 30, "target_modules": ["layer"], "init_theta_d_bound": 0.3, "proj_seed": 5}
    torch.manual_seed(3)
    pm = get_peft_model(layer_and_input(kind)[0], UniLoraConfig(**config))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(layer_and_input(kind)[0], peft.UniLoraConfig(**config))
    their_buffers = dict(theirs.named_buffers())
    for key, tensor in [*pm.state_dict().items(), *pm.named_buffers()]:
        assert torch.equal(tensor, their_buffers.get(key, theirs.state_dict().get(key))), key
    x = layer_and_input(kind)[1]
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=1e-7, rtol=1e-6)
    for m in (pm, theirs):
        m(x=x).pow(2).sum().backward()
    torch.testing.assert_close(pm.base_model.unilora_theta_d["default"].grad,
                               theirs.base_model.unilora_theta_d["default"].grad, atol=1e-5, rtol=1e-5)
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["base_model.unilora_theta_d.default"]
    torch.testing.assert_close(output(pm, {"x": x}), output(theirs, {"x": x}), atol=1e-6, rtol=1e-6)


def test_init_values():
    pm = get_peft_model(tiny_llama(), UniLoraConfig(init_theta_d_bound=0.1))
    theta = pm.base_model.unilora_theta_d["default"]
    assert theta.shape == (256,) and 0 < theta.abs().max() <= 0.1
    pm = get_peft_model(tiny_llama(), UniLoraConfig(init_weights=False))  # N(0, 1)
    assert pm.base_model.unilora_theta_d["default"].abs().max() > 1


def test_second_adapter_has_its_own_theta_and_assignment():
    pm = get_peft_model(tiny_llama(), UniLoraConfig(theta_d_length=64))
    pm.add_adapter("other", UniLoraConfig(theta_d_length=32, r=2, target_modules=["v_proj", "o_proj"], proj_seed=1))
    tuner = pm.base_model
    assert tuner.unilora_theta_d["other"].shape == (32,) and tuner.unilora_theta_d["default"].shape == (64,)
    v_proj = tuner.model.model.layers[0].self_attn.v_proj
    assert v_proj.unilora_indices_A["other"].shape == (2, 32) and int(v_proj.unilora_indices_A["other"].max()) < 32
    tuner.set_adapter(["default", "other"])
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == [
        "base_model.unilora_theta_d.default", "base_model.unilora_theta_d.other"]
    pm.eval()
    want = {**_reference_deltas(pm)}
    for key, delta in _reference_deltas(pm, "other").items():
        want[key] = want.get(key, 0) + delta
    x = torch.randn(2, 3, 32)
    key = "base_model.model.model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(v_proj(x), base_output(v_proj, x, want[key]), atol=ATOL, rtol=1e-5)
    pm.delete_adapter("other")
    assert "other" not in tuner.unilora_theta_d and not any(".other" in k for k in pm.state_dict())


@pytest.mark.parametrize("save_indices", [False, True])
def test_files_cross_both_ways_with_peft(save_indices, tmp_path):
    config = {"target_modules": ["q_proj", "v_proj"], "theta_d_length": 64, "init_theta_d_bound": 0.3,
              "save_indices": save_indices}
    x = make_inputs("llama")
    ours = get_peft_model(tiny_llama(), UniLoraConfig(**config))
    perturb_trainable(ours, std=0.2)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors")))
    assert "base_model.unilora_theta_d" in keys and (len(keys) == 1 + 16 * save_indices)  # 4 per layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(output(theirs.eval(), x), output(ours, x), atol=1e-6, rtol=1e-5)

    theirs = peft.get_peft_model(tiny_llama(), peft.UniLoraConfig(**config))
    perturb_trainable(theirs, seed=3, std=0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, x), output(theirs, x), atol=1e-6, rtol=1e-5)


def test_inject_adapter_in_model_refused_as_peft():
    """PEFT's UniLoraModel has ``uses_shared_state=True`` (θ lives on the tuner): refused."""
    assert UniLoraModel.uses_shared_state is peft.UniLoraModel.uses_shared_state is True
    with pytest.raises(ConfigError, match="^`inject_adapter_in_model` does not support PeftType.UNILORA"):
        deltatune.inject_adapter_in_model(UniLoraConfig(), tiny_llama())


def test_config_fields_and_defaults_match_peft():
    ours, theirs = UniLoraConfig().to_dict(), peft.UniLoraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad", [{"r": 0}, {"theta_d_length": 0}, {"unilora_dropout": 1.5},
                                 {"init_theta_d_bound": 0.0}, {"bias": "lora_only"},
                                 {"target_modules": "q_proj", "layers_to_transform": 0}])
def test_bad_config_refused_with_peft_sentence(bad):
    with pytest.raises(ValueError) as their_error:
        peft.UniLoraConfig(**bad)
    with pytest.raises(ConfigError) as our_error:
        UniLoraConfig(**bad)
    assert str(our_error.value).startswith(str(their_error.value))


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: UniLoraConfig(init_theta_d_bound=0.3, target_modules=["c_attn"]),
                         "unilora_", tmp_path, identity_at_init=False)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", UniLoraConfig(theta_d_length=64),
                       UniLoraConfig(theta_d_length=32, r=2, target_modules=["k_proj", "o_proj"]), tmp_path)
