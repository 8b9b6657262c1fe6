"""TinyLoRA layers against a reference built from the paper's formula, against peft's layer on the same tensors
(outputs, merged weights, gradients), PEFT's seeded draw of ``P`` and its weight-tying groups, identity at init,
merge/unmerge, several adapters and PEFT's refusal for them, files both ways with peft, and the model-level
contract (GPT-2's Conv1D, embeddings; the tiny Llama's q/v are the contract suite's).

The reference takes its own SVD of the base weight and sums ``v_i P_i`` in a Python loop, ``ΔW = (U_r √σ) (Σ_i v_i
P_i) (√σ V_rᵀ)``; ``P_i`` are drawn here from ``N(0, 1/r)`` with the documented seed.
"""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import PeftModel, TinyLoraConfig, TinyLoraLayer, TinyLoraModel, get_peft_model
from deltatune.errors import ConfigError, ConfigTypeError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|tinylora_P|projection tensors P)")


def _config(lib=deltatune, **kwargs):
    kwargs = {"r": 3, "u": 5, "target_modules": ["layer"], "init_weights": "uniform", "init_v_bound": 0.5, **kwargs}
    return lib.TinyLoraConfig(**kwargs)


def _reference_delta(weight: torch.Tensor, v: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """``ΔW: (out, in)`` of ``weight: (out, in)`` by the formula (module docstring)."""
    u_, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    r = min(r, *weight.shape)
    b = u_[:, :r] * s[:r].sqrt()
    a = s[:r].sqrt()[:, None] * vh[:r]
    p = torch.normal(0.0, 1 / r**0.5, (len(v), r, r), generator=torch.Generator().manual_seed(seed)).double()
    mix = sum(v[i].double() * p[i] for i in range(len(v)))
    return (b @ mix @ a).float()


def _weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as ``(out, in)`` (GPT-2's ``Conv1D`` stores it transposed)."""
    w = layer.base_layer.weight.detach()
    return w.T if layer.fan_in_fan_out else w


@pytest.mark.parametrize("kind", ["linear", "conv1D", "embedding"])
def test_matches_reference(kind):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, _config(projection_seed=7)).eval()
    layer = pm.base_model.model.layer
    assert isinstance(layer, TinyLoraLayer) and isinstance(pm.base_model, TinyLoraModel)
    v = pm.base_model.tinylora_v["default"]["0"]
    assert layer.tinylora_v["default"] is v and v.shape == (5,)
    delta = _reference_delta(_weight(layer), v.detach(), 3, seed=7)  # the only target: index 0
    torch.testing.assert_close(layer.get_delta_weight("default"), delta.T if layer.fan_in_fan_out else delta,
                               atol=1e-5, rtol=1e-4)
    if kind == "embedding":
        want = F.embedding(x, layer.base_layer.weight + delta)
    else:
        want = base_output(layer, x, delta)
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-4)
    assert_merge_round_trip(pm, layer, x, want, ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "embedding"])
def test_equals_peft_layer_on_the_same_tensors(kind):
    """Same tensors (A, B, P from the same SVD and seed, then v copied): equal outputs, ΔW and gradients."""
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, _config(tinylora_dropout=0.0))
    theirs = peft.get_peft_model(layer_and_input(kind)[0], _config(peft))
    their_state = theirs.state_dict()
    with torch.no_grad():
        for name, tensor in pm.state_dict().items():
            if "tinylora_" in name:
                assert torch.equal(tensor, their_state[name]) or "tinylora_v" in name, name  # same SVD and draw
                tensor.copy_(their_state[name])
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
    pm.train(), theirs.train()
    for m in (pm, theirs):
        m(x=x).float().pow(2).sum().backward()
    ours_v, their_v = pm.base_model.tinylora_v["default"]["0"], theirs.base_model.tinylora_v["default"]["0"]
    torch.testing.assert_close(ours_v.grad, their_v.grad, atol=1e-4, rtol=1e-4)
    pm.eval(), theirs.eval()
    torch.testing.assert_close(output(pm, {"x": x}), output(theirs, {"x": x}), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("weight_tying", [0.0, 0.4, 1.0])
def test_weight_tying_groups_and_draws_are_peft(weight_tying):
    """Groups of consecutive targets share one vector (the very Parameter), PEFT's groups; every tensor is
    PEFT's from the same seeds (uniform v from the global seed, P from projection_seed + layer index)."""
    config = {"target_modules": ["q_proj", "k_proj", "v_proj", "embed_tokens"], "weight_tying": weight_tying,
              "init_weights": "uniform", "u": 6, "projection_seed": 3}
    torch.manual_seed(5)
    ours = get_peft_model(tiny_llama(), TinyLoraConfig(**config))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(), peft.TinyLoraConfig(**config))
    their_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, their_state[key]), key
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, TinyLoraLayer)}
    their_layers = dict(theirs.named_modules())
    for name, layer in layers.items():
        assert layer.tinylora_v.keys_of["default"] == their_layers[name]._tinylora_v_key["default"], name
    vectors = ours.base_model.tinylora_v["default"]
    assert len(vectors) == {0.0: 7, 0.4: 4, 1.0: 1}[weight_tying]  # 7 targets: round(7 * 0.6) = 4 groups
    for group, v in vectors.items():
        sharing = [n for n, m in layers.items() if m.tinylora_v["default"] is v]
        assert sharing, group
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [f"base_model.tinylora_v.default.{g}" for g in vectors]  # each vector once
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_identity_at_init_and_init_values():
    x = make_inputs("llama")
    base = output(tiny_llama(), x)
    fresh = get_peft_model(tiny_llama(), TinyLoraConfig())
    assert torch.equal(fresh.base_model.tinylora_v["default"]["0"], torch.zeros(64))
    torch.testing.assert_close(output(fresh, x), base, atol=0, rtol=0)
    for init in ("uniform", False):  # False: PEFT leaves memory uninitialised; deltatune draws as "uniform"
        pm = get_peft_model(tiny_llama(), TinyLoraConfig(init_weights=init, init_v_bound=0.1))
        v = torch.cat(list(pm.base_model.tinylora_v["default"].values()))
        assert v.abs().max() <= 0.1 and v.abs().min() > 0 and torch.isfinite(v).all()
        assert (output(pm, x) - base).abs().max() > 1e-4


def test_rank_capped_by_the_layer_and_half_precision_base():
    """``r`` above ``min(out, in)`` uses the full SVD (PEFT's); over a bfloat16 base the factors are formed in
    bfloat16 as PEFT's and kept in float32 (its adapter-dtype autocast), and the vector is float32."""
    model, x = layer_and_input("linear", dims=(16, 4))
    pm = get_peft_model(model, _config(r=8))
    layer = pm.base_model.model.layer
    assert layer.r["default"] == 4 and layer.tinylora_P["default"].shape == (5, 4, 4)
    half = get_peft_model(layer_and_input("linear")[0].to(torch.bfloat16), _config())
    theirs = peft.get_peft_model(layer_and_input("linear")[0].to(torch.bfloat16), _config(peft))
    their_state = theirs.state_dict()
    for key, tensor in half.state_dict().items():
        if "tinylora_A" in key or "tinylora_B" in key:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, their_state[key]), key
    assert half.base_model.tinylora_v["default"]["0"].dtype == torch.float32
    assert output(half, {"x": x.to(torch.bfloat16)}).dtype == torch.bfloat16


def test_cast_down_keeps_the_vector_shared():
    """``autocast_adapter_dtype=False`` replaces the model's vector by a bfloat16 one: every layer of the group
    sees the new one (the layers look it up, they do not hold it)."""
    config = TinyLoraConfig(target_modules=["q_proj", "v_proj"], weight_tying=1.0)
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), config, autocast_adapter_dtype=False)
    v = pm.base_model.tinylora_v["default"]["0"]
    assert v.dtype == torch.bfloat16 and v.requires_grad
    layers = [m for m in pm.modules() if isinstance(m, TinyLoraLayer)]
    assert len(layers) == 4 and all(m.tinylora_v["default"] is v for m in layers)


def test_second_adapter_has_its_own_vectors_and_keeps_the_first_index_as_peft():
    """A further adapter's P is seeded with the index the layer got when first wrapped (PEFT's), its groups come
    from its own targets; deleting it removes its vectors."""
    first = {"target_modules": ["q_proj", "v_proj"], "init_weights": "uniform", "u": 4}
    second = {"target_modules": ["v_proj", "o_proj"], "init_weights": "uniform", "u": 3, "weight_tying": 1.0,
              "projection_seed": 9}
    models = []
    for lib in (deltatune, peft):
        torch.manual_seed(1)
        pm = lib.get_peft_model(tiny_llama(), lib.TinyLoraConfig(**first))
        pm.add_adapter("other", lib.TinyLoraConfig(**second))
        models.append(pm)
    ours, theirs = models
    their_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, their_state[key]), key
    assert list(ours.base_model.tinylora_v["other"]) == ["0"]
    perturb_trainable(ours, std=0.2)
    ours.base_model.set_adapter(["default", "other"])
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        *(f"base_model.tinylora_v.default.{g}" for g in "0123"), "base_model.tinylora_v.other.0"]
    with torch.no_grad():
        ours.base_model.tinylora_v["other"]["0"].normal_()
    ours.eval()
    layer = ours.base_model.model.model.layers[1].self_attn.v_proj
    x = torch.randn(2, 3, 32)
    both = layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(layer(x), base_output(layer, x, both), atol=ATOL, rtol=1e-5)
    ours.delete_adapter("other")
    assert "other" not in ours.base_model.tinylora_v and not any(".other" in k for k in ours.state_dict())
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.o_proj, nn.Linear)  # unwrapped again


def test_save_projection_mismatch_refused_like_peft():
    theirs = peft.get_peft_model(tiny_llama(), peft.TinyLoraConfig())
    with pytest.raises(TypeError) as their_error:
        theirs.add_adapter("two", peft.TinyLoraConfig(save_projection=False))
    ours = get_peft_model(tiny_llama(), TinyLoraConfig())
    keys = set(ours.state_dict())
    with pytest.raises(ConfigTypeError, match="use save_projection=True") as our_error:
        ours.add_adapter("two", TinyLoraConfig(save_projection=False))
    assert str(our_error.value).startswith(str(their_error.value))
    assert list(ours.peft_config) == ["default"] and set(ours.state_dict()) == keys  # nothing half-added
    ours.add_adapter("three", TinyLoraConfig(projection_seed=1))  # another seed is fine (P is per layer)


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_cross_both_ways_with_peft(save_projection, tmp_path):
    config = {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "weight_tying": 0.5, "u": 8,
              "save_projection": save_projection}
    x = make_inputs("llama")
    ours = get_peft_model(tiny_llama(), TinyLoraConfig(**config))
    perturb_trainable(ours, std=0.2)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=False)
    keys = set(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors")))
    # 5 targets, round(5 * 0.5) = 2 groups (Python's round, as PEFT's)
    assert {k for k in keys if "tinylora_v" in k} == {"base_model.tinylora_v.0", "base_model.tinylora_v.1"}
    assert any(k.endswith(".tinylora_P") for k in keys) == save_projection
    assert all(k.endswith((".tinylora_A", ".tinylora_B", ".tinylora_P")) for k in keys if "tinylora_v" not in k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(output(theirs.eval(), x), output(ours, x), atol=1e-6, rtol=1e-5)

    theirs = peft.get_peft_model(tiny_llama(), peft.TinyLoraConfig(**config))
    perturb_trainable(theirs, seed=3, std=0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, x), output(theirs, x), atol=1e-6, rtol=1e-5)


def test_file_with_projections_into_a_config_without_warns_and_redraws():
    """PEFT's warning when a state dict holds ``P`` but the config does not save them; the redrawn ``P`` stay."""
    source = get_peft_model(tiny_llama(), TinyLoraConfig(init_weights="uniform"))
    state = deltatune.get_peft_model_state_dict(source)
    with torch.no_grad():
        for key in [k for k in state if k.endswith(".tinylora_P")]:
            state[key] = state[key] * 2
    target = get_peft_model(tiny_llama(), TinyLoraConfig(save_projection=False))
    before = {k: v.clone() for k, v in target.base_model.named_buffers() if "tinylora_P" in k}
    with pytest.warns(UserWarning, match="^Specified to not load tinylora_P from state dictionary however"):
        deltatune.set_peft_model_state_dict(target, state)
    after = dict(target.base_model.named_buffers())
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(output(target, make_inputs("llama")), output(source, make_inputs("llama")),
                               atol=1e-6, rtol=1e-5)


def test_inject_adapter_in_model_refused_as_peft():
    """PEFT's TinyLoraModel has ``uses_shared_state=True`` (the vectors live on the tuner): refused."""
    assert TinyLoraModel.uses_shared_state is peft.TinyLoraModel.uses_shared_state is True
    with pytest.raises(ConfigError, match="^`inject_adapter_in_model` does not support PeftType.TINYLORA"):
        deltatune.inject_adapter_in_model(TinyLoraConfig(), tiny_llama())


def test_config_fields_and_defaults_match_peft():
    ours, theirs = TinyLoraConfig().to_dict(), peft.TinyLoraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 0}, "^`r` should be a positive integer"),
                                       ({"u": 0}, "^`u` should be a positive integer"),
                                       ({"weight_tying": 1.5}, "^`weight_tying` should be a float between"),
                                       ({"layers_pattern": "layers"}, "^When `layers_pattern` is specified"),
                                       ({"bias": "lora_only"}, "tinylora_only"),
                                       ({"init_weights": "gaussian"}, "uniform")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        TinyLoraConfig(**bad)
    if not match.startswith("^"):
        return
    with pytest.raises(ValueError) as their_error:
        peft.TinyLoraConfig(**bad)
    with pytest.raises(ConfigError) as our_error:
        TinyLoraConfig(**bad)
    assert str(our_error.value).startswith(str(their_error.value))


def test_gpt2_model_contract(tmp_path):
    # not wte: GPT-2 ties it to the output layer, so a merge into it would change both
    check_model_contract(tiny_gpt2, "gpt2", lambda: TinyLoraConfig(u=8, target_modules=["c_attn", "c_fc"]),
                         "tinylora_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", TinyLoraConfig(u=8),
                       TinyLoraConfig(u=4, weight_tying=1.0, target_modules=["k_proj", "o_proj", "embed_tokens"]),
                       tmp_path)
