"""PVeRA layers against reference math (the mean path at inference, the sampled path while training), against
peft's layer on the same tensors (outputs, noise from the same seed, merged weights, gradients), the shared seeded
projections (PEFT's draw, one copy per model, saved or redrawn), identity at init, merge/unmerge, several adapters
and PEFT's refusals for them, files both ways with peft, the tuner class as PEFT's, and the model-level contract
(GPT-2's Conv1D; the tiny Llama is the contract suite's).
"""

from __future__ import annotations

import math
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support.family_checks import check_model_contract
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, layer_and_input
from support.models import output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import PeftModel, PveraConfig, PveraLayer, PveraModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|pvera_A)")


class Two(nn.Module):
    """``a: 16 -> 12`` then ``b: 12 -> 20``: projections sized (in 16, out 20)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 12), nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _config(lib=deltatune, **kwargs):
    return lib.PveraConfig(**{"r": 3, "target_modules": ["a", "b"], "init_weights": False, **kwargs})


def _reference(layer: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, eps=None, name="default"):
    """``W x + b + λ_b ⊙ (B[:out] z)``, ``z = μ + exp(log σ² / 2) ε`` (``μ`` alone when ``eps`` is None), with
    ``μ = λ_d[:r] ⊙ (A[:r, :in] x)`` and ``log σ² = λ_d[r:] ⊙ (A[r:, :in] x)``."""
    base = layer.base_layer
    w = base.weight.T if type(base).__name__ == "Conv1D" else base.weight
    out_f, in_f = w.shape
    lb, ld = layer.pvera_lambda_b[name], layer.pvera_lambda_d[name]
    r = ld.shape[0] // 2
    mu = ld[:r] * (x @ A[:r, :in_f].T)
    z = mu if eps is None else mu + torch.exp(0.5 * ld[r:] * (x @ A[r:, :in_f].T)) * eps
    return F.linear(x, w, base.bias) + lb * (z @ B[:out_f].T)


def test_matches_reference_and_projections_are_shared():
    pm = get_peft_model(Two(), _config())
    pm.eval()
    model, tuner = pm.base_model.model, pm.base_model
    assert isinstance(tuner, PveraModel) and isinstance(model.a, PveraLayer)
    A, B = tuner.pvera_A["default"], tuner.pvera_B["default"]
    assert A.shape == (6, 16) and B.shape == (20, 3)  # (2r, max in), (max out, r)
    assert model.a.pvera_lambda_d["default"].shape == (6,) and model.a.pvera_lambda_b["default"].shape == (12,)
    assert model.a.pvera_A is model.b.pvera_A is tuner.pvera_A  # one copy, referenced by the layers
    assert not any("pvera_A" in n or "pvera_B" in n for n, _ in pm.named_parameters())
    x = torch.randn(3, 5, 16)
    expected = _reference(model.b, _reference(model.a, x, A, B), A, B)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, model.b, x, expected, ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_equals_peft_layer_on_the_same_tensors_and_noise(kind):
    model, x = layer_and_input(kind)
    config = {"r": 4, "target_modules": ["layer"], "init_weights": False, "generator_seed": 5}
    pm = get_peft_model(model, PveraConfig(**config))
    theirs = peft.get_peft_model(layer_and_input(kind)[0], peft.PveraConfig(**config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "pvera_" in name:
                p.copy_(theirs.get_parameter(name) + 0.1 * torch.randn_like(p))
                theirs.get_parameter(name).copy_(p)
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    # Training: z is sampled, from generators seeded alike, so the outputs and gradients are equal too.
    pm.train(), theirs.train()
    ours_out, their_out = pm(x=x), theirs(x=x)
    torch.testing.assert_close(ours_out, their_out, atol=ATOL, rtol=1e-5)
    ours_out.pow(2).sum().backward()
    their_out.pow(2).sum().backward()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs.get_parameter(name).grad, atol=1e-4, rtol=1e-5)
    pm.eval(), theirs.eval()
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, ATOL)


def test_sampling_while_training_and_at_inference():
    pm = get_peft_model(Two(), _config(generator_seed=1))
    layer, tuner = pm.base_model.model.b, pm.base_model
    A, B = tuner.pvera_A["default"], tuner.pvera_B["default"]
    h = torch.randn(4, 12)
    pm.eval()
    torch.testing.assert_close(layer(h), _reference(layer, h, A, B), atol=ATOL, rtol=1e-5)  # the mean
    pm.train()
    eps = torch.randn((4, 3), generator=torch.Generator().manual_seed(1))  # the layer's first draw
    torch.testing.assert_close(layer(h), _reference(layer, h, A, B, eps), atol=ATOL, rtol=1e-5)
    assert not torch.allclose(layer(h), layer(h))  # the generator moves on
    sampled = get_peft_model(Two(), _config(sample_at_inference=True)).eval().base_model.model.b
    assert not torch.allclose(sampled(h), sampled(h))


def test_projections_are_peft_seeded_draw():
    ours = get_peft_model(Two(), _config(projection_prng_key=3)).base_model
    theirs = peft.get_peft_model(Two(), _config(peft, projection_prng_key=3)).base_model
    for attr in ("pvera_A", "pvera_B"):
        assert torch.equal(getattr(ours, attr)["default"], getattr(theirs, attr)["default"]), attr
    A = ours.pvera_A["default"]
    assert A.abs().max() <= math.sqrt(6 / 16) and A.abs().max() > 0.8 * math.sqrt(6 / 16)  # Kaiming-uniform
    assert not torch.equal(A, get_peft_model(Two(), _config(projection_prng_key=4)).base_model.pvera_A["default"])


def test_identity_at_init():
    pm = get_peft_model(Two(), _config(init_weights=True, d_initial=0.2))
    layer = pm.base_model.model.a
    assert torch.equal(layer.pvera_lambda_b["default"], torch.zeros(12))
    assert torch.equal(layer.pvera_lambda_d["default"], torch.full((6,), 0.2))
    x = torch.randn(2, 16)
    for mode in (pm.train, pm.eval):  # λ_b = 0 zeroes the sampled path too
        mode()
        torch.testing.assert_close(pm(x=x), Two()(x), atol=0, rtol=0)


def test_second_adapter_shares_the_projections():
    pm = get_peft_model(Two(), _config())
    pm.add_adapter("other", _config(target_modules=["b"]))
    tuner = pm.base_model
    assert tuner.pvera_A["other"] is tuner.pvera_A["default"]  # the same tensors, as PEFT
    tuner.set_adapter(["default", "other"])
    pm.eval()
    model, A, B = tuner.model, tuner.pvera_A["default"], tuner.pvera_B["default"]
    h = torch.randn(2, 12)
    expected = _reference(model.b, h, A, B) + _reference(model.b, h, A, B, name="other") - model.b.base_layer(h)
    torch.testing.assert_close(model.b(h), expected, atol=ATOL, rtol=1e-5)
    pm.delete_adapter("other")
    assert "other" not in tuner.pvera_A


BAD = [  # (second adapter's config, deltatune's hint after PEFT's sentence); the first has r=3 on a and b
    ({"projection_prng_key": 1}, r"use projection_prng_key=0"),
    ({"save_projection": False}, r"the shared projections are saved for all adapters or none"),
    ({"r": 4}, r"^pvera_B has a size of 3 but 4 or greater .* use r=3"),
    ({"r": 7}, r"^pvera_A has a size of 6 but 7 or greater .* use r=3"),
    ({"r": 2}, r"needs the first one's r: use r=3"),  # PEFT accepts it, then fails in the forward
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k, _ in BAD])
def test_incompatible_second_adapter_refused_like_peft(kwargs, message):
    ours = get_peft_model(Two(), _config())
    keys = set(ours.state_dict())
    with pytest.raises(ConfigError, match=message) as our_error:
        ours.add_adapter("two", _config(**kwargs))
    assert list(ours.peft_config) == ["default"] and set(ours.state_dict()) == keys  # nothing half-added
    theirs = peft.get_peft_model(Two(), _config(peft))
    if kwargs.get("r") == 2:
        theirs.add_adapter("two", _config(peft, **kwargs))
        theirs.base_model.set_adapter("two")
        with pytest.raises(RuntimeError):
            theirs(torch.randn(2, 16))
        return
    with pytest.raises(ValueError) as their_error:
        theirs.add_adapter("two", _config(peft, **kwargs))
    assert str(our_error.value).startswith(str(their_error.value))


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_cross_both_ways_with_peft(save_projection, tmp_path):
    ours = get_peft_model(Two(), _config(save_projection=save_projection))
    perturb_trainable(ours, std=0.2)
    ours.eval()
    x = torch.randn(3, 16)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors")))
    assert ({"base_model.pvera_A", "base_model.pvera_B"} <= keys) == save_projection
    theirs = peft.PeftModel.from_pretrained(Two(), tmp_path / "ours")
    torch.testing.assert_close(output(theirs.eval(), {"x": x}), output(ours, {"x": x}), atol=1e-6, rtol=1e-5)

    theirs = peft.get_peft_model(Two(), _config(peft, save_projection=save_projection))
    perturb_trainable(theirs, seed=3, std=0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(Two(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, {"x": x}), output(theirs, {"x": x}), atol=1e-6, rtol=1e-5)


def test_tuner_class_and_config_as_peft():
    """What tests/test_tuner_api.py checks for the other methods (its row for PVERA has no config: it asserts shared
    state for VeRA alone, while PEFT's PveraModel has it too)."""
    model = get_peft_model(Two(), _config())
    assert type(model.base_model) is PveraModel and model.get_model_status().adapter_model_type == "PveraModel"
    assert PveraModel.uses_shared_state is peft.PveraModel.uses_shared_state is True
    assert PveraModel.prefix == peft.PveraModel.prefix == "pvera_lambda_"
    for arch in ("llama", "dinov2"):
        assert PveraModel.target_module_mapping[arch] == peft.PveraModel.target_module_mapping[arch]
    with pytest.raises(ConfigError, match="^`inject_adapter_in_model` does not support PeftType.PVERA"):
        deltatune.inject_adapter_in_model(_config(), Two())
    ours, theirs = PveraConfig().to_dict(), peft.PveraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 0}, "^`r` should be a positive integer"),
                                       ({"bias": "lora_only"}, "pvera_only"),
                                       ({"layers_pattern": "h"}, "^When `layers_pattern` is specified")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        PveraConfig(**bad)


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: PveraConfig(r=8, target_modules=["c_attn", "c_fc"]),
                         "pvera_lambda_", tmp_path)


def test_llama_default_targets():
    model = get_peft_model(tiny_llama(), PveraConfig(r=4))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
