"""FRoD: the factorisation ``W = U diag(λ0) Vᵀ`` and the shared basis against float64 references from the paper's
formulas, ``S``'s positions against PEFT's enumeration, the layer against ``U (diag(λ) + S) Vᵀ`` built entry by
entry, against peft's layer on the same tensors, dropout and several adapters, merge/unmerge, PEFT's refusals and
warnings, files both ways with peft (with and without the projections), and the model contract on GPT-2.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_same_as_peft_layer, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import FrodConfig, FrodLayer, FrodModel, PeftModel, get_peft_model, get_peft_model_state_dict
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.frod.layer import sparse_positions

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|Sparse invariant)")


class Blocks(nn.Module):
    """Three blocks of ``q: 16->16``, ``up: 16->24``, ``down: 24->16`` (roles ``q``, ``up``, ``down``: bases from
    QR, 48 or 72 stacked rows) and a ``head: 16->4`` (one 4-row weight: the SVD branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(16, 16), "up": nn.Linear(16, 24), "down": nn.Linear(24, 16)})
            for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block["q"](x)
            x = x + block["down"](torch.tanh(block["up"](x)))
        return self.head(x)


def _blocks(**config):
    config.setdefault("progressbar", False)
    config.setdefault("target_modules", ["q", "up", "down", "head"])
    return get_peft_model(Blocks(), FrodConfig(**config)).eval()


def _weight(layer: FrodLayer) -> torch.Tensor:
    base = layer.base_layer
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _adapted_weight(layer: FrodLayer, name: str = "default") -> torch.Tensor:
    """``U (diag(λ) + S) Vᵀ`` with ``S`` written entry by entry from its positions."""
    lam = layer.frod_lambda_l[name]
    middle = torch.diag(lam.detach()).clone()
    indices = layer.frod_s_indices[name][layer.category]
    for k, (i, j) in enumerate(indices.T.tolist()):
        middle[i, j] += layer.frod_lambda_s_values[name][k].item()
    return layer.frod_U[name] @ middle @ layer.frod_V[name][layer.category].T


# ---- the math --------------------------------------------------------------------------------------------------

def test_factorisation_and_shared_basis_against_float64_references():
    pm = _blocks()
    model = pm.base_model.model
    x = torch.randn(5, 16)
    for block in model.layers:
        for layer in block.values():
            w, u = _weight(layer), layer.frod_U["default"]
            torch.testing.assert_close(u * layer.frod_lambda_l["default"] @ layer.frod_V["default"][layer.category].T,
                                       w, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(u.norm(dim=0), torch.ones(u.shape[1]), atol=1e-5, rtol=0)
    for role, in_dim in (("q", 16), ("up", 16), ("down", 24)):  # V = Rᵀ E, E: eigenvectors of mean (Q_lᵀQ_l + αI)⁻¹
        stacked = torch.cat([block[role].weight.double() for block in model.layers])
        q, r = torch.linalg.qr(stacked)
        rows = stacked.shape[0] // 3
        t = sum(torch.linalg.inv(q[i * rows:(i + 1) * rows].T @ q[i * rows:(i + 1) * rows]
                                 + 1e-3 * torch.eye(in_dim, dtype=torch.float64)) for i in range(3)) / 3
        want = r.T @ torch.linalg.eigh(t)[1]
        got = pm.base_model.frod_V["default"][role].double()
        sign = torch.sign((want * got).sum(0))  # eigenvectors are defined up to sign
        torch.testing.assert_close(got, want * sign, atol=1e-4, rtol=1e-3)
    head = model.head  # 4 stacked rows < 16: V holds the right singular vectors, orthonormal
    basis = pm.base_model.frod_V["default"]["head"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(head(x), F.linear(x, head.base_layer.weight, head.base_layer.bias), atol=1e-5, rtol=0)


def test_sparse_positions_are_pefts_draws():
    for in_dim, rate in ((16, 0.01), (16, 0.3), (7, 1.0), (24, 0.0), (1, 0.5)):
        got = sparse_positions(in_dim, rate, torch.Generator().manual_seed(3))
        rows, cols = torch.meshgrid(torch.arange(in_dim), torch.arange(in_dim), indexing="ij")  # PEFT's table
        pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        nnz = min(int(in_dim * in_dim * rate), pairs.shape[0])
        nnz = max(1, nnz) if rate > 0 and pairs.shape[0] else nnz
        want = pairs[torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(3))[:nnz]].T
        assert torch.equal(got, want if nnz else torch.empty(2, 0, dtype=torch.long)), (in_dim, rate)
        assert bool((got[0] != got[1]).all()) and len({tuple(p) for p in got.T.tolist()}) == got.shape[1]


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_layer_matches_reference(kind):
    model, x = layer_and_input(kind)
    pm = get_peft_model(model, FrodConfig(target_modules=["layer"], init_weights=False, sparse_rate=0.2,
                                          progressbar=False)).eval()
    layer = pm.base_model.model.layer
    assert layer.frod_lambda_s_values["default"].shape == (int(16 * 16 * 0.2),)
    want = F.linear(x, _adapted_weight(layer), layer.base_layer.bias)
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-5)
    delta = layer.get_delta_weight("default")  # W' - W, in the base weight's layout
    want_delta = _adapted_weight(layer) - _weight(layer)
    torch.testing.assert_close(delta, want_delta.T if kind == "conv1D" else want_delta, atol=ATOL, rtol=1e-5)
    w0 = layer.base_layer.weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)  # restored exactly


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_equals_peft_layer_on_the_same_tensors(kind):
    model, x = layer_and_input(kind)
    config = dict(target_modules=["layer"], sparse_rate=0.2, progressbar=False)
    pm = get_peft_model(copy.deepcopy(model), FrodConfig(**config)).eval()
    perturb_trainable(pm, seed=2, std=0.2)
    theirs = peft.get_peft_model(model, peft.FrodConfig(**config)).eval()
    peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(pm))
    layer, their_layer = pm.base_model.model.layer, theirs.base_model.model.layer
    assert torch.equal(layer.frod_U["default"], their_layer.frod_U["default"])
    assert_same_as_peft_layer(pm, layer, theirs, their_layer, x, atol=ATOL, unmerge_atol=0)


def test_dropout_and_two_active_adapters_add_their_replacements():
    """``base(x) + Σ_a (W'_a h_a - W h_a)``; with dropout, ``h_a = dropout(x)`` in training."""
    model, x = layer_and_input("linear")
    pm = get_peft_model(model, FrodConfig(target_modules=["layer"], init_weights=False, progressbar=False))
    pm.add_adapter("other", FrodConfig(target_modules=["layer"], init_weights=False, frod_dropout=0.5,
                                       progressbar=False))
    layer = pm.base_model.model.layer
    pm.base_model.set_adapter(["default", "other"])
    w, b = _weight(layer).detach().clone(), layer.base_layer.bias
    pm.eval()
    want = F.linear(x, w + (_adapted_weight(layer) - w) + (_adapted_weight(layer, "other") - w), b)
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-5)
    pm.train()
    torch.manual_seed(4)
    got = layer(x)
    torch.manual_seed(4)
    h = F.dropout(x, 0.5, training=True)
    want = F.linear(x, _adapted_weight(layer), b) + F.linear(h, _adapted_weight(layer, "other") - w)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    pm.eval().merge_adapter(["default", "other"])  # both against the weight before the first merge
    torch.testing.assert_close(F.linear(x, layer.base_layer.weight, b),
                               F.linear(x, _adapted_weight(layer) + _adapted_weight(layer, "other") - w, b),
                               atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w)


# ---- config and PEFT's refusals ------------------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = FrodConfig().to_dict(), peft.FrodConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "FROD" and FrodConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}
    assert isinstance(_blocks().base_model, FrodModel) and FrodModel.prefix == "frod_"


@pytest.mark.parametrize("bad,match", [
    ({"sparse_rate": 1.5}, "`sparse_rate` should be between 0 and 1, got 1.5"),
    ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also be"),
    ({"frod_dropout": 1.0}, "frod_dropout"), ({"bias": "lora_only"}, "frod_only"),
])
def test_bad_config_is_a_clear_error_with_pefts_sentence(bad, match):
    with pytest.raises(ConfigError, match=match):
        FrodConfig(**bad)


@pytest.mark.parametrize("field,value,match", [
    ("projection_prng_key", 1, "FRoD projection initialization key must be the same for all adapters. Got "
                               "config.projection_prng_key=1 but previous config had 0."),
    ("save_projection", False, r"FRoD projection weights must be saved for all adapters or none, but got multiple "
                               r"different values: \[False, True\]"),
    ("runtime_offload_base_weight", True, "FRoD runtime base-weight offloading must be enabled for all adapters or "
                                          "none"),
])
def test_second_adapter_must_share_pefts_settings(field, value, match):
    pm = _blocks()
    with pytest.raises(ConfigError, match=match):
        pm.add_adapter("other", FrodConfig(target_modules=["q"], progressbar=False, **{field: value}))
    assert list(pm.peft_config) == ["default"] and "other" not in pm.base_model.frod_V


def test_unsupported_targets_are_refused():
    with pytest.raises(TargetModuleError, match="unsupported type: 0 \\(Embedding\\)"):
        get_peft_model(nn.Sequential(nn.Embedding(10, 4)), FrodConfig(target_modules=["0"]))


@pytest.mark.parametrize("kind,flag,message", [
    ("conv1D", False, "fan_in_fan_out is set to False but the target module is `Conv1D`"),
    ("linear", True, "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
])
def test_fan_in_fan_out_warning_as_peft(kind, flag, message):
    model, _ = layer_and_input(kind)
    config = FrodConfig(target_modules=["layer"], fan_in_fan_out=flag, progressbar=False)
    with pytest.warns(UserWarning, match=message):
        get_peft_model(model, config)
    assert config.fan_in_fan_out == (kind == "conv1D")


# ---- files -------------------------------------------------------------------------------------------------

def test_projections_in_files_or_rebuilt_both_ways_with_peft(tmp_path):
    """``save_projection=False``: files hold λ and S only, both libraries rebuild V and S's positions from the base
    weights and the seed; PEFT's refusal of a file without them when the config says they were saved."""
    inputs = make_inputs("llama")
    ours = get_peft_model(tiny_llama(), FrodConfig(save_projection=False, progressbar=False, sparse_rate=0.05))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    assert not any("frod_V" in k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)

    config = FrodConfig.from_pretrained(tmp_path / "ours")
    config.save_projection = True
    with pytest.raises(ValueError, match="Specified to load FRoD projection tensors from state dictionary however "
                                         "they were not present."):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours", config=config)


def test_a_file_with_projections_loaded_without_them_warns_as_peft(tmp_path):
    ours = get_peft_model(tiny_llama(), FrodConfig(progressbar=False))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path)
    config = FrodConfig.from_pretrained(tmp_path)
    config.save_projection = False
    with pytest.warns(UserWarning, match="Specified to not load FRoD projection tensors from state dictionary "
                                         "however they are present."):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    torch.testing.assert_close(output(loaded, make_inputs("llama")), output(ours, make_inputs("llama")),
                               atol=1e-6, rtol=1e-5)  # the rebuilt projections are the saved ones


def test_loaded_basis_rebuilds_U(tmp_path):
    """A file whose ``V`` differs from the one built here (a column's sign flipped, as another LAPACK may give it,
    with the ``S`` entries of that row and column flipped too: the same ``W'``) gives the same logits: ``U`` is
    rebuilt from the loaded ``V``."""
    inputs = make_inputs("llama")
    ours = get_peft_model(tiny_llama(), FrodConfig(progressbar=False, sparse_rate=0.2))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    role, j = "self_attn_q_proj", 3
    state[f"base_model.frod_V.{role}"][:, j] *= -1
    rows, cols = state[f"base_model.frod_s_indices.{role}"]
    for key in [k for k in state if k.endswith("q_proj.frod_lambda_s_values")]:
        state[key][(rows == j) ^ (cols == j)] *= -1
    save_file(state, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, inputs), output(ours, inputs), atol=1e-5, rtol=1e-5)


def test_gpt2_contract_and_files_both_ways_with_peft(tmp_path):
    """GPT-2's ``Conv1D`` (``W`` stored ``(in, out)``): the model contract, and peft loads deltatune's files and
    deltatune loads peft's, with equal logits."""
    inputs = make_inputs("gpt2")
    targets = ["c_attn", "c_fc"]
    check_model_contract(tiny_gpt2, "gpt2", lambda: FrodConfig(target_modules=targets, progressbar=False), "frod_",
                         tmp_path / "contract")
    ours = get_peft_model(tiny_gpt2(), FrodConfig(target_modules=targets, progressbar=False))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=1e-6, rtol=1e-5)

    made = peft.get_peft_model(tiny_gpt2(), peft.FrodConfig(target_modules=targets, fan_in_fan_out=True,
                                                            progressbar=False))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=1e-6, rtol=1e-5)
    merged = copy.deepcopy(loaded).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), output(made.merge_and_unload(), inputs), atol=ATOL, rtol=1e-4)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", FrodConfig(progressbar=False),
                       FrodConfig(target_modules=["q_proj", "down_proj"], sparse_rate=0.05, progressbar=False),
                       tmp_path)


def test_runtime_offload_flag_keeps_the_outputs():
    """On the CPU the offloaded weight stays where it is; the flag changes no number and survives ``.to()``."""
    inputs = make_inputs("llama")
    plain = get_peft_model(tiny_llama(), FrodConfig(progressbar=False))
    offload = get_peft_model(tiny_llama(), FrodConfig(progressbar=False, runtime_offload_base_weight=True))
    offload.to(torch.float32)
    torch.testing.assert_close(output(offload, inputs), output(plain, inputs), atol=0, rtol=0)
    offload.merge_adapter()
    plain.merge_adapter()
    torch.testing.assert_close(output(offload, inputs), output(plain, inputs), atol=0, rtol=0)


def test_tuner_class_as_peft():
    """``tests/test_tuner_api.py``'s tuner-class checks for FRoD, whose state is shared (``uses_shared_state``)."""
    pm = _blocks()
    their_tuner = peft.PEFT_TYPE_TO_TUNER_MAPPING["FROD"]
    assert type(pm.base_model) is FrodModel and FrodModel.__name__ == their_tuner.__name__
    assert pm.get_model_status().adapter_model_type == "FrodModel"
    assert pm.base_model.prefix == their_tuner.prefix == "frod_" and pm.base_model.tuner_layer_cls is FrodLayer
    assert pm.base_model.uses_shared_state is their_tuner.uses_shared_state is True
    for model_type in ("llama", "gpt2", "phi", "vit", "bert", "t5"):  # PEFT's table is VeRA's plus ViT
        assert FrodModel.target_module_mapping[model_type] == their_tuner.target_module_mapping[model_type]
