"""RandLoRA layers against a reference sum over the bases, against peft's layer on the same tensors (outputs,
merged weights, gradients), the shared seeded bases (PEFT's draw, one copy per model, saved or redrawn), identity
at init, merge/unmerge, several adapters and PEFT's refusals for them, files both ways with peft, and the
model-level contract (GPT-2's Conv1D; the tiny Llama is the contract suite's).

The reference builds ``ΔW`` from the paper's ``Σ_b B_b Λ_b A Γ_b`` with ``einsum`` over the basis index ``b`` and
the rank index ``k``, not with the layer's flatten-and-matmul.
"""

from __future__ import annotations

import math
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import PeftModel, RandLoraConfig, RandLoraLayer, RandLoraModel, get_peft_model
from deltatune.errors import ConfigError, TargetModuleError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|basis_A)")


class Two(nn.Module):
    """``a: 16 -> 12`` (in > out) then ``b: 12 -> 20`` (in < out): both orientations, bases sized (20, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 12), nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _config(lib=deltatune, **kwargs):
    kwargs = {"r": 5, "target_modules": ["a", "b"], "init_weights": False, "randlora_alpha": 10, **kwargs}
    return lib.RandLoraConfig(**kwargs)


def _reference_delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``ΔW: (out, in)`` as ``s Σ_{k,b} B'[:, k, b] λ[k, b] (A[k] ⊙ γ[b])`` on the small side, transposed when
    ``in > out``. ``B'[:, k, b]`` is the column of ``B`` PEFT pairs with rank ``k`` of basis ``b`` (its flat
    column ``k n + b`` of ``B[:D, :n]``)."""
    lam, gamma = layer.randlora_lambda[name], layer.randlora_gamma[name]
    r, n = lam.shape
    small = gamma.shape[1]
    big = max(layer.in_features, layer.out_features)
    paired = B[:big, :n].reshape(big, n * r).reshape(big, r, n)
    delta = layer.scaling[name] * torch.einsum("okb,kb,ki,bi->oi", paired, lam, A[:, 0, :small], gamma)
    return delta if layer.in_features <= layer.out_features else delta.T


def test_matches_reference_and_bases_are_shared():
    pm = get_peft_model(Two(), _config())
    pm.eval()
    model, tuner = pm.base_model.model, pm.base_model
    assert isinstance(tuner, RandLoraModel) and isinstance(model.a, RandLoraLayer)
    A, B = tuner.randlora_A["default"], tuner.randlora_B["default"]
    assert A.shape == (5, 1, 16) and B.shape == (20, 4, 5)  # (r, 1, d_max), (D_max, ceil(16/5), r)
    assert model.a.randlora_lambda["default"].shape == (5, 3) and model.a.randlora_gamma["default"].shape == (3, 12)
    assert model.a.randlora_A is model.b.randlora_A is tuner.randlora_A  # one copy, referenced by the layers
    assert not any("randlora_A" in n or "randlora_B" in n for n, _ in pm.named_parameters())
    assert sum(".randlora_A." in k for k in pm.state_dict()) == 1
    x = torch.randn(3, 5, 16)
    h = base_output(model.a, x, _reference_delta(model.a, A, B))
    torch.testing.assert_close(output(pm, {"x": x}), base_output(model.b, h, _reference_delta(model.b, A, B)),
                               atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, model.b, x, output(pm, {"x": x}), ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_equals_peft_layer_on_the_same_tensors(kind):
    model, x = layer_and_input(kind)
    config = {"r": 3, "target_modules": ["layer"], "init_weights": False, "randlora_alpha": 6}
    pm = get_peft_model(model, RandLoraConfig(**config))
    theirs = peft.get_peft_model(layer_and_input(kind)[0], peft.RandLoraConfig(**config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "randlora_" in name:
                p.copy_(theirs.state_dict()[name] + 0.1 * torch.randn_like(p))
                theirs.get_parameter(name).copy_(p)
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
    pm.train(), theirs.train()
    pm(x=x).pow(2).sum().backward()  # support.models.output runs without gradients
    theirs(x=x).pow(2).sum().backward()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs.get_parameter(name).grad, atol=1e-5, rtol=1e-5)
    pm.eval(), theirs.eval()
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, ATOL)


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_are_peft_seeded_draw(kind):
    flags = {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse"}
    ours = get_peft_model(Two(), _config(projection_prng_key=3, **flags)).base_model
    theirs = peft.get_peft_model(Two(), _config(peft, projection_prng_key=3, **flags)).base_model
    for attr in ("randlora_A", "randlora_B"):
        assert torch.equal(getattr(ours, attr)["default"], getattr(theirs, attr)["default"]), attr
    A, B = ours.randlora_A["default"], ours.randlora_B["default"]
    assert A.dtype == torch.float32 and abs(B.std().item() - 1) < 1e-2  # unit std (in bfloat16 when dense)
    if kind == "dense":
        other = get_peft_model(Two(), _config(projection_prng_key=4)).base_model
        assert not torch.equal(A, other.randlora_A["default"])
    else:  # ternary: three values, P(±1) = 1/6 (sparse) or 1/(2 sqrt(16)) = 1/8 (very sparse)
        assert len(torch.unique(B)) == 3
        p = 1 / 6 if kind == "sparse" else 1 / (2 * math.sqrt(16))
        assert abs((B > 0).float().mean().item() - p) < 0.06


def test_identity_at_init_and_init_values():
    pm = get_peft_model(Two(), _config(init_weights=True))
    layer = pm.base_model.model.a  # 16 -> 12: d = 12, n = ceil(12/5) = 3
    assert torch.equal(layer.randlora_lambda["default"], torch.zeros(5, 3))
    assert torch.equal(layer.randlora_gamma["default"], torch.full((3, 12), 1 / 12))
    assert layer.scaling["default"] == 2.0
    x = torch.randn(2, 16)
    torch.testing.assert_close(output(pm, {"x": x}), Two()(x), atol=0, rtol=0)


def test_second_adapter_shares_the_bases_and_adds():
    pm = get_peft_model(Two(), _config())
    pm.add_adapter("other", _config(target_modules=["b"]))
    tuner, model = pm.base_model, pm.base_model.model
    assert tuner.randlora_A["other"] is tuner.randlora_A["default"]  # the same tensors, as PEFT
    perturb_trainable(pm, std=0.2)
    tuner.set_adapter(["default", "other"])
    pm.eval()
    x = torch.randn(2, 16)
    A, B = tuner.randlora_A["default"], tuner.randlora_B["default"]
    h = base_output(model.a, x, _reference_delta(model.a, A, B))
    both = _reference_delta(model.b, A, B) + _reference_delta(model.b, A, B, "other")
    torch.testing.assert_close(output(pm, {"x": x}), base_output(model.b, h, both), atol=ATOL, rtol=1e-5)
    pm.delete_adapter("other")
    assert "other" not in tuner.randlora_A and not any(".other" in k for k in pm.state_dict())


BAD = [  # (second adapter's config, deltatune's hint after PEFT's sentence); the first has r=5 on a and b
    ({"projection_prng_key": 1}, r"use projection_prng_key=0"),
    ({"save_projection": False}, r"the shared random bases are saved for all adapters or none"),
    ({"r": 8}, r"use r=5"),
    ({"r": 3}, r"needs the first one's r: use r=5"),  # PEFT accepts it, then fails in the forward
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k, _ in BAD])
def test_incompatible_second_adapter_refused_like_peft(kwargs, message):
    ours = get_peft_model(Two(), _config())
    keys = set(ours.state_dict())
    with pytest.raises(ConfigError, match=message) as our_error:
        ours.add_adapter("two", _config(**kwargs))
    assert list(ours.peft_config) == ["default"] and set(ours.state_dict()) == keys  # nothing half-added
    theirs = peft.get_peft_model(Two(), _config(peft))
    if kwargs.get("r") == 3:
        theirs.add_adapter("two", _config(peft, **kwargs))
        theirs.base_model.set_adapter("two")
        with pytest.raises(RuntimeError):
            theirs(torch.randn(2, 16))
        return
    with pytest.raises(ValueError) as their_error:
        theirs.add_adapter("two", _config(peft, **kwargs))
    assert str(our_error.value).startswith(str(their_error.value))


def test_larger_layer_for_second_adapter_refused_like_peft():
    class Three(Two):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Linear(20, 30)

    theirs = peft.get_peft_model(Three(), _config(peft))
    with pytest.raises(ValueError, match="^randlora_B has a size of 20 but 30 or greater is required"):
        theirs.add_adapter("two", _config(peft, target_modules=["c"]))
    ours = get_peft_model(Three(), _config())
    with pytest.raises(ConfigError, match="^randlora_B has a size of 20 but 30 or greater is required.*largest"):
        ours.add_adapter("two", _config(target_modules=["c"]))


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_cross_both_ways_with_peft(save_projection, tmp_path):
    ours = get_peft_model(Two(), _config(save_projection=save_projection))
    perturb_trainable(ours, std=0.2)
    ours.eval()
    x = torch.randn(3, 16)
    want = output(ours, {"x": x})
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors")))
    # PEFT's layout: the model's bases, and a copy under every layer (PEFT warns of missing keys without them)
    bases = {"base_model.randlora_A", "base_model.randlora_B", "base_model.model.a.randlora_A",
             "base_model.model.a.randlora_B", "base_model.model.b.randlora_A", "base_model.model.b.randlora_B"}
    assert (keys & bases == bases) if save_projection else not keys & bases
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(Two(), tmp_path / "ours")
    assert not [w for w in caught if "missing" in str(w.message)]
    torch.testing.assert_close(output(theirs.eval(), {"x": x}), want, atol=1e-6, rtol=1e-5)

    theirs = peft.get_peft_model(Two(), _config(peft, save_projection=save_projection))
    perturb_trainable(theirs, seed=3, std=0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(Two(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, {"x": x}), output(theirs, {"x": x}), atol=1e-6, rtol=1e-5)


def test_state_dicts_with_layer_copies_load_both_ways():
    """``get_peft_model_state_dict`` returns PEFT's layout (per-layer copies of the bases included), and
    ``set_peft_model_state_dict`` takes it, deltatune's or peft's, into either library."""
    theirs = peft.get_peft_model(Two(), _config(peft))
    perturb_trainable(theirs, std=0.2)
    ours = get_peft_model(Two(), _config())
    perturb_trainable(ours, seed=2, std=0.2)
    x = torch.randn(3, 16)
    for source, target_lib in ((theirs, deltatune), (ours, peft)):
        state = (peft if source is theirs else deltatune).get_peft_model_state_dict(source)
        assert "base_model.model.a.randlora_A" in state and "base_model.randlora_B" in state
        target = target_lib.get_peft_model(Two(), _config(target_lib, projection_prng_key=0))
        target_lib.set_peft_model_state_dict(target, state)
        torch.testing.assert_close(output(target.eval(), {"x": x}), output(source.eval(), {"x": x}), atol=1e-6,
                                   rtol=1e-5)


def test_file_bases_are_what_loads(tmp_path):
    """With ``save_projection`` the file's bases are used, not a redraw from the seed."""
    pm = get_peft_model(Two(), _config())
    with torch.no_grad():
        pm.base_model.randlora_B["default"].mul_(-1.5)
    pm.eval()
    x = torch.randn(3, 16)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Two(), tmp_path)
    torch.testing.assert_close(output(loaded, {"x": x}), output(pm, {"x": x}), atol=1e-6, rtol=0)


def test_inject_adapter_in_model_works_as_peft():
    """PEFT's RandLoraModel has ``uses_shared_state=False``: injection without the wrapper is allowed."""
    assert RandLoraModel.uses_shared_state is peft.RandLoraModel.uses_shared_state is False
    model = deltatune.inject_adapter_in_model(_config(), Two())
    x = torch.randn(2, 16)
    perturb_trainable(model, std=0.2)
    assert model.b.get_delta_weight("default").shape == (20, 12)
    assert (model(x) - Two()(x)).abs().max() > 1e-3


def test_config_fields_and_defaults_match_peft():
    ours, theirs = RandLoraConfig().to_dict(), peft.RandLoraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 0}, "^`r` should be a positive integer"),
                                       ({"bias": "lora_only"}, "randlora_only"),
                                       ({"randlora_dropout": 1.5}, "randlora_dropout")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        RandLoraConfig(**bad)


def test_embedding_is_refused_clearly():
    with pytest.raises(TargetModuleError, match="unsupported type"):
        get_peft_model(tiny_llama(), RandLoraConfig(r=4, target_modules=["embed_tokens"]))


def test_gpt2_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: RandLoraConfig(r=8, randlora_alpha=8, target_modules=["c_attn"]),
                         "randlora_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", RandLoraConfig(r=8, randlora_alpha=8),
                       RandLoraConfig(r=8, randlora_alpha=8, target_modules=["k_proj", "o_proj"]), tmp_path)
