"""PSOFT layers against reference math (Linear, GPT-2's Conv1D), against peft's own layer on the same tensors (every
parametrisation of ``R`` and both SVD inits/backends), identity at init, dropout, merge/unmerge, gradients on ``R``
only, several adapters, PEFT's refusals and warnings, files both ways with peft, and the model-level contract.

The reference is computed here in float64 from the paper's formula: ``R = diag(b) (I + Q)(I − Q)⁻¹ diag(a)`` by an
explicit inverse, ``ΔW = s B (R − I) A``; ``A``, ``B`` are checked against the SVD of ``W`` through
sign-independent identities (``A Aᵀ = I``, ``s B A`` = the rank-``r`` truncation of ``W``).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, assert_same_as_peft_layer, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

from deltatune import PeftModel, PsoftConfig, PsoftLayer, PsoftModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5


def _adapt(kind: str = "linear", **config):
    model, x = layer_and_input(kind)
    config.setdefault("r", 4)
    config.setdefault("init_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Conv1D: fan_in_fan_out follows the layer
        pm = get_peft_model(model, PsoftConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _w(layer: nn.Module) -> torch.Tensor:
    """``W: (out, in)`` as ``F.linear`` reads it."""
    w = layer.base_layer.weight
    return w.T if layer.fan_in_fan_out else w


def _rotation(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``R`` in float64 from the paper: ``diag(b) (I + Q)(I − Q)⁻¹ diag(a)`` (or the free matrix)."""
    orth = layer.psoft_R[name]
    r = orth.size
    if orth.orth:
        q = torch.zeros(r, r, dtype=torch.float64)
        iu = torch.triu_indices(r, r, 1)
        q[iu[0], iu[1]] = orth.weight.detach().double()
        q = q - q.T
        eye = torch.eye(r, dtype=torch.float64)
        rot = (eye + q) @ torch.linalg.inv(eye - q)
    else:
        rot = orth.weight.detach().double()
    if orth.vector_b is not None:
        rot = torch.diag(orth.vector_b.detach().double()) @ rot
    if orth.vector_a is not None:
        rot = rot @ torch.diag(orth.vector_a.detach().double())
    return rot


def _delta(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``s B (R − I) A: (out, in)`` in float64."""
    sub, r = layer.psoft_subspace[name], layer.r[name]
    rot = _rotation(layer, name) - torch.eye(r, dtype=torch.float64)
    return (layer.scaling[name] * sub.B.double() @ rot @ sub.A.double()).float()


def _reference(layer: nn.Module, x: torch.Tensor, names=("default",)) -> torch.Tensor:
    return base_output(layer, x, sum(_delta(layer, n) for n in names))


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_matches_reference_and_the_svd_of_the_weight(kind):
    pm, layer, x = _adapt(kind, psoft_alpha=8)
    assert isinstance(layer, PsoftLayer) and isinstance(pm.base_model, PsoftModel)
    sub, s = layer.psoft_subspace["default"], layer.scaling["default"]
    assert s == 2.0 and sub.A.shape == (4, 16) and sub.B.shape == (12, 4)
    assert layer.psoft_R["default"].weight.shape == (6,)  # r(r-1)/2
    w = _w(layer).detach().double()
    u, sv, vh = torch.linalg.svd(w)
    torch.testing.assert_close(sub.A.double() @ sub.A.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # psoft_init: orthonormal rows
    torch.testing.assert_close(s * sub.B.double() @ sub.A.double(), u[:, :4] @ torch.diag(sv[:4]) @ vh[:4],
                               atol=1e-5, rtol=0)  # the rank-r truncation of W
    torch.testing.assert_close(output(pm, {"x": x}), _reference(layer, x), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"),
                               _delta(layer).T if kind == "conv1D" else _delta(layer), atol=1e-6, rtol=1e-5)


def test_pissa_init_splits_the_singular_values_symmetrically():
    _, layer, _ = _adapt(ab_svd_init="pissa_init", psoft_alpha=8)
    sub, s = layer.psoft_subspace["default"], layer.scaling["default"]
    torch.testing.assert_close(sub.A @ sub.A.T, sub.B.T @ sub.B, atol=1e-5, rtol=1e-5)  # both diag(S_r / s)
    sv = torch.linalg.svdvals(_w(layer).detach())[:4]
    torch.testing.assert_close(torch.diagonal(sub.A @ sub.A.T), sv / s, atol=1e-5, rtol=1e-5)


VARIANTS = [
    {},
    {"psoft_orth": False},
    {"psoft_mag_a": False, "psoft_mag_b": False},
    {"use_cayley_neumann": True, "num_cayley_neumann_terms": 3},
    {"use_cayley_neumann": True, "cayley_neumann_eps": 0.5},
    {"ab_svd_init": "pissa_init", "psoft_alpha": 4},
    {"psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 2, "random_seed": 3},
]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: ",".join(c) or "default")
def test_equals_peft_layer_on_the_same_tensors(config):
    pm, layer, x = _adapt(**config)
    model, _ = layer_and_input("linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft.get_peft_model(model, peft.PsoftConfig(target_modules=["layer"], r=4, init_weights=False,
                                                             **config)).eval()
    their_layer = theirs.base_model.model.layer
    torch.testing.assert_close(layer.psoft_subspace["default"].A, their_layer._psoft_A_cache["default"])
    torch.testing.assert_close(layer.psoft_subspace["default"].B, their_layer._psoft_B_cache["default"])
    perturb_trainable(pm, seed=4, std=0.2)  # the magnitudes too
    their_layer.psoft_R["default"].load_state_dict(layer.psoft_R["default"].state_dict())
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL)


def test_cayley_rotation_is_orthogonal_and_the_neumann_series_close_to_it():
    _, exact, _ = _adapt(psoft_mag_a=False, psoft_mag_b=False)
    rot = exact.psoft_R["default"].get_matrix()
    torch.testing.assert_close(rot @ rot.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.double(), _rotation(exact), atol=1e-5, rtol=1e-5)
    _, series, _ = _adapt(psoft_mag_a=False, psoft_mag_b=False, use_cayley_neumann=True,
                          num_cayley_neumann_terms=12)
    torch.testing.assert_close(series.psoft_R["default"].get_matrix(), rot, atol=1e-4, rtol=0)  # same seed: same q


def test_neumann_eps_bounds_the_generator():
    _, layer, _ = _adapt(use_cayley_neumann=True, cayley_neumann_eps=0.1)
    orth = layer.psoft_R["default"]
    with torch.no_grad():
        orth.weight.mul_(50)  # ‖Q‖ far above 0.1
    assert torch.linalg.norm(orth._generator()).item() == pytest.approx(0.1, rel=1e-5)


def test_identity_at_init_then_merge_round_trip():
    pm, layer, x = _adapt(init_weights=True)
    orth = layer.psoft_R["default"]
    assert torch.count_nonzero(orth.weight) == 0 and torch.equal(orth.vector_a, torch.ones(4))
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=1e-6, rtol=0)
    perturb_trainable(pm, seed=2, std=0.2)
    expected = output(pm, {"x": x})
    torch.testing.assert_close(expected, _reference(layer, x), atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_gradients_reach_R_and_its_magnitudes_only():
    pm, layer, x = _adapt()
    pm.train()
    pm(x=x).square().sum().backward()
    orth = layer.psoft_R["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (orth.weight, orth.vector_a, orth.vector_b))
    sub = layer.psoft_subspace["default"]
    assert not sub.A.requires_grad and not sub.B.requires_grad and not layer.base_layer.weight.requires_grad
    assert not any("psoft_subspace" in k for k in pm.state_dict() if k.endswith((".A", ".B")))  # never saved


def test_dropout_acts_on_the_adapter_input():
    pm, layer, x = _adapt(psoft_dropout=0.5)
    pm.train()
    torch.manual_seed(3)
    got = output(pm, {"x": x})
    torch.manual_seed(3)
    h = F.dropout(x, 0.5, training=True) @ layer.psoft_subspace["default"].A.T
    rot = _rotation(layer).float() - torch.eye(4)
    want = base_output(layer, x) + layer.scaling["default"] * h @ rot.T @ layer.psoft_subspace["default"].B.T
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_two_adapters_add():
    pm, layer, x = _adapt()
    pm.add_adapter("other", PsoftConfig(target_modules=["layer"], r=2, init_weights=False, psoft_orth=False))
    pm.base_model.set_adapter(["default", "other"])
    expected = _reference(layer, x, ("default", "other"))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = PsoftConfig().to_dict(), peft.PsoftConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "PSOFT" and PsoftConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}


@pytest.mark.parametrize("bad,match", [
    ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used when"),
    ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must"),
    ({"r": 0}, r"`r` must be a positive integer; got 0\."),
    ({"ab_svd_init": "olora"}, "`ab_svd_init` must be one of"),
    ({"psoft_svd": "qr"}, "`psoft_svd` must be one of"),
    ({"use_cayley_neumann": True, "num_cayley_neumann_terms": 0}, "`num_cayley_neumann_terms` must be a positive"),
    ({"use_cayley_neumann": True, "cayley_neumann_eps": 1.5}, r"`cayley_neumann_eps` must be in \(0, 1\)"),
])
def test_bad_config_is_refused_with_peft_sentence(bad, match):
    with pytest.raises(ConfigError, match=match):
        PsoftConfig(**bad)
    with pytest.raises(ValueError, match=match):
        peft.PsoftConfig(**bad)


@pytest.mark.parametrize("given,match", [
    ({"psoft_svd_lowrank_niter": 3}, "`psoft_svd_lowrank_niter` is only used when"),
    ({"num_cayley_neumann_terms": 3}, "`num_cayley_neumann_terms` is only used when"),
    ({"cayley_neumann_eps": 0.5}, "`cayley_neumann_eps` is only used when"),
])
def test_ignored_fields_warn_as_peft(given, match):
    with pytest.warns(UserWarning, match=match):
        PsoftConfig(**given)


def test_rank_above_the_layer_width_refused_with_peft_sentence():
    with pytest.raises(ValueError, match=r"`r` \(13\) must be less than or equal to min\(in_features, out_features\) "
                                         r"\(16, 12\)"):
        _adapt(r=13)


def test_fan_in_fan_out_follows_the_layer_with_peft_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True is not compatible with `torch.nn.Linear`"):
        pm, _, _ = get_peft_model(layer_and_input("linear")[0], PsoftConfig(target_modules=["layer"], r=2,
                                                                            fan_in_fan_out=True)), None, None
    assert pm.peft_config["default"].fan_in_fan_out is False
    with pytest.warns(UserWarning, match="Conv1D"):
        pm = get_peft_model(layer_and_input("conv1D")[0], PsoftConfig(target_modules=["layer"], r=2))
    assert pm.peft_config["default"].fan_in_fan_out is True


def test_unsupported_layer_type_is_refused():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(layer_and_input("embedding")[0], PsoftConfig(target_modules=["layer"], r=2))


# ---- whole models and files ----------------------------------------------------------------------

def test_model_contract_gpt2(tmp_path):
    """Beyond PEFT: GPT-2's ``Conv1D`` projections."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_model_contract(tiny_gpt2, "gpt2", lambda: PsoftConfig(r=4, target_modules=["c_attn", "c_fc"]),
                             "psoft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", PsoftConfig(r=2),
                       PsoftConfig(r=4, target_modules=["q_proj", "down_proj"], psoft_orth=False), tmp_path)


def test_files_cross_both_ways_with_peft_for_every_option(tmp_path):
    """The low-rank SVD (seeded), PiSSA's split, a free ``R``, no magnitudes, the Neumann series: peft loads
    deltatune's files and deltatune loads peft's with equal logits."""
    inputs = make_inputs("llama")
    options = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    variants = [{"psoft_svd": "lowrank", "random_seed": 5, "ab_svd_init": "pissa_init", "psoft_mag_a": False},
                {"psoft_orth": False, "psoft_mag_b": False, "use_cayley_neumann": True, "cayley_neumann_eps": 0.9}]
    for i, variant in enumerate(variants):
        ours = get_peft_model(tiny_llama(), PsoftConfig(**options, **variant))
        perturb_trainable(ours, seed=5, std=0.2)
        ours.eval().save_pretrained(tmp_path / f"ours{i}")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / f"ours{i}").eval()
        torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

        made = peft.get_peft_model(tiny_llama(), peft.PsoftConfig(**options, **variant))
        perturb_trainable(made, seed=6, std=0.2)
        made.eval().save_pretrained(tmp_path / f"theirs{i}")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / f"theirs{i}")
        torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
        torch.testing.assert_close(output(loaded.merge_and_unload(), inputs), output(made.merge_and_unload(), inputs),
                                   atol=ATOL, rtol=1e-4)


def test_over_a_4bit_base_reads_the_dequantised_weight_and_unloads_exactly():
    """Beyond PEFT (whose PSOFT refuses a quantised weight): the SVD is of the dequantised nf4 weight, and
    ``merge_and_unload`` returns dense ``nn.Linear`` layers with the adapted logits."""
    pytest.importorskip("bitsandbytes")
    from deltatune.quantization import dequantize_weight, quantize

    inputs = make_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(quantize(tiny_llama(), "nf4"), PsoftConfig(r=4, init_weights=False,
                                                                         target_modules=["q_proj"])).eval()
        layer = ours.base_model.model.model.layers[0].self_attn.q_proj
        assert repr(layer).startswith("psoft.Linear4bit")
        u, sv, vh = torch.linalg.svd(dequantize_weight(layer.base_layer).double())
        sub = layer.psoft_subspace["default"]
        torch.testing.assert_close(layer.scaling["default"] * sub.B.double() @ sub.A.double(),
                                   u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-5, rtol=0)
        got = output(ours, inputs)
        plain = ours.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(output(plain, inputs), got, atol=ATOL, rtol=1e-4)


def test_export_to_lora_is_exact_at_rank_r():
    """``ΔW = s B (R − I) A`` has rank ≤ r, so a rank-r LoRA holds it (PEFT's ``supports_lora_conversion``)."""
    from deltatune import export_to_lora

    model = get_peft_model(tiny_llama(), PsoftConfig(r=4, init_weights=False, task_type="CAUSAL_LM")).eval()
    assert export_to_lora(model, rank=4).report["max_rel_error"] < 1e-5
