"""HiRA layers against reference math (Linear, Conv1D, Conv1d/2d/3d, grouped conv, Embedding), against peft's own
layer on the same tensors, identity at init, dropout, merge/unmerge, several adapters, PEFT's refusals and
warnings, files both ways with peft, and the model-level contract (tiny Llama, GPT-2, BERT).

References are computed here from the layer's tensors with ``einsum`` over the paper's formula
``ΔW = W0 ⊙ (B A)``, not with the layer's flatten-and-matmul.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import HiraConfig, HiraLayer, HiraModel, PeftModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
KINDS = ["linear", "conv1D", "embedding", "conv1d", "conv2d", "conv2d_1x1", "conv3d", "conv2d_groups"]


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config.setdefault("r", 3)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, HiraConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _modulation(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``B A`` in the layout ``F.linear``/the conv read the weight (``(out, in, *k)``), ``(num, dim)`` for an
    embedding, from the paper's sum ``Σ_p B[o, p] A[p, c, ...]``."""
    if isinstance(layer.base_layer, nn.Embedding):
        return torch.einsum("dp,pn->nd", layer.hira_embedding_B[name], layer.hira_embedding_A[name])
    a, b = layer.hira_A[name], layer.hira_B[name]
    return torch.einsum("op,pc...->oc...", b.reshape(b.shape[0], b.shape[1]), a)


def _w0(layer: nn.Module) -> torch.Tensor:
    base = layer.base_layer
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _reference(layer: nn.Module, x: torch.Tensor, names=("default",)) -> torch.Tensor:
    """``base(x)`` with ``W0 + Σ W0 ⊙ (B_i A_i)``."""
    delta = sum(_w0(layer) * _modulation(layer, n) for n in names)
    if isinstance(layer.base_layer, nn.Embedding):
        return F.embedding(x, layer.base_layer.weight + delta)
    return base_output(layer, x, delta)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind):
    pm, layer, x = _adapt(kind)
    assert isinstance(layer, HiraLayer) and isinstance(pm.base_model, HiraModel)
    if kind == "linear":
        assert layer.hira_A["default"].shape == (3, 16) and layer.hira_B["default"].shape == (12, 3)
    if kind == "conv2d":
        assert layer.hira_A["default"].shape == (3, 3, 3, 3) and layer.hira_B["default"].shape == (5, 3, 1, 1)
    if kind == "embedding":
        assert layer.hira_embedding_A["default"].shape == (3, 30)
        assert layer.hira_embedding_B["default"].shape == (12, 3)
        assert (layer.in_features, layer.out_features) == (30, 12)  # PEFT's
    torch.testing.assert_close(output(pm, {"x": x}), _reference(layer, x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "conv2d_groups"])  # PEFT refuses groups > 1
def test_equals_peft_layer_on_the_same_tensors(kind):
    pm, layer, x = _adapt(kind)
    model, _ = layer_and_input(kind)
    theirs = peft.get_peft_model(model, peft.HiraConfig(target_modules=["layer"], r=3, init_weights=False)).eval()
    peft_layer = theirs.base_model.model.layer
    with torch.no_grad():
        for attr in HiraLayer.adapter_layer_names:
            for name, p in getattr(layer, attr).items():
                getattr(peft_layer, attr)[name].copy_(p)
    want = output(theirs, {"x": x})
    torch.testing.assert_close(output(pm, {"x": x}), want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"))
    pm.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_then_merge_round_trip(kind, init):
    pm, layer, x = _adapt(kind, init_weights=init)
    zero, other = ("hira_embedding_A", "hira_embedding_B") if kind == "embedding" else ("hira_B", "hira_A")
    assert torch.count_nonzero(getattr(layer, zero)["default"]) == 0
    assert torch.count_nonzero(getattr(layer, other)["default"]) > 0
    base = F.embedding(x, layer.base_layer.weight) if kind == "embedding" else base_output(layer, x)
    torch.testing.assert_close(output(pm, {"x": x}), base, atol=0, rtol=0)
    if init == "gaussian" and kind == "linear":  # N(0, 1/r²)
        assert abs(layer.hira_A["default"].std().item() - 1 / 3) < 0.1
    with torch.no_grad():
        getattr(layer, zero)["default"].normal_(std=0.5)
    expected = output(pm, {"x": x})
    torch.testing.assert_close(expected, _reference(layer, x), atol=ATOL, rtol=1e-5)
    if kind == "embedding":
        w0 = layer.base_layer.weight.detach().clone()
        pm.merge_adapter()
        torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
        pm.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight, w0)
    else:
        assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_two_adapters_add_and_merge_against_the_original_weight():
    """Two active adapters: ``W0 + W0 ⊙ B1 A1 + W0 ⊙ B2 A2`` (each term against the unmerged ``W0``), merged one
    at a time as well; unmerging gives ``W0`` back bit for bit."""
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", HiraConfig(target_modules=["layer"], r=2, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    expected = _reference(layer, x, ("default", "other"))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["default"])
    layer.merge(adapter_names=["other"])
    want = w0 + w0 * _modulation(layer, "default") + w0 * _modulation(layer, "other")
    torch.testing.assert_close(layer.base_layer.weight, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    pm, layer, x = _adapt("linear")
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.hira_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
    assert layer._weight_before_merge is None


def test_dropout_acts_on_the_adapter_input():
    pm, layer, x = _adapt("linear", hira_dropout=0.5)
    pm.train()
    torch.manual_seed(3)
    got = output(pm, {"x": x})
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    want = base_output(layer, x) + F.linear(dropped, _w0(layer) * _modulation(layer))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    pm.eval()
    torch.testing.assert_close(output(pm, {"x": x}), _reference(layer, x), atol=ATOL, rtol=1e-5)


def test_gradients_reach_A_and_B_only():
    pm, layer, x = _adapt("conv1D")
    pm.train()
    pm(x=x).square().sum().backward()
    assert layer.hira_A["default"].grad is not None and layer.hira_B["default"].grad is not None
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = HiraConfig().to_dict(), peft.HiraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "HIRA" and HiraConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}


@pytest.mark.parametrize("bad,match", [
    ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used when"),
    ({"target_modules": ".*q", "layers_pattern": "layers"}, "`layers_pattern` cannot be used when"),
    ({"r": 0}, "positive"), ({"hira_dropout": 1.0}, "hira_dropout"), ({"init_weights": "pissa"}, "Unknown"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        HiraConfig(**bad)


def test_zero_rank_from_rank_pattern_refused_with_peft_sentence():
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        HiraLayer(nn.Linear(4, 4)).update_layer("default", r=0)


def test_rank_pattern():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pm = get_peft_model(model, HiraConfig(target_modules=["0", "1"], r=4, rank_pattern={"1": 2}))
    assert pm.base_model.model[0].r["default"] == 4 and pm.base_model.model[1].hira_A["default"].shape == (2, 8)


@pytest.mark.parametrize("kind,flag,message", [
    ("conv1D", False, "fan_in_fan_out is set to False but the target module is `Conv1D`"),
    ("linear", True, "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
])
def test_fan_in_fan_out_warning_as_peft(kind, flag, message):
    with pytest.warns(UserWarning, match=message):
        _adapt(kind, fan_in_fan_out=flag)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _adapt(kind, fan_in_fan_out=not flag)


def test_unsupported_layer_type_is_refused():
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm"):
        get_peft_model(model, HiraConfig(target_modules=["0"]))


# ---- whole models and files ----------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: HiraConfig(r=4, task_type="CAUSAL_LM")),
    # not wte: GPT-2 ties it to lm_head, so merging it would change the head too (as in PEFT)
    ("gpt2", tiny_gpt2, "gpt2", lambda: HiraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    ("bert", tiny_bert, "bert", lambda: HiraConfig(r=4, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's Conv1D: PEFT's fan_in_fan_out warning
        check_model_contract(factory, kind, config, "hira_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", HiraConfig(r=2),
                       HiraConfig(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"]), tmp_path)


def test_gpt2_files_cross_both_ways_with_peft(tmp_path):
    """GPT-2 (``Conv1D`` projections and the ``wte`` embedding): peft loads deltatune's files and deltatune loads
    peft's, with equal logits."""
    inputs = make_inputs("gpt2")
    targets = ["c_attn", "c_proj", "c_fc", "wte"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = get_peft_model(tiny_gpt2(), HiraConfig(r=4, target_modules=targets, fan_in_fan_out=True))
        perturb_trainable(ours, seed=5, std=0.2)
        ours.eval().save_pretrained(tmp_path / "ours")
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
        torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

        made = peft.get_peft_model(tiny_gpt2(), peft.HiraConfig(r=4, target_modules=targets, fan_in_fan_out=True))
        perturb_trainable(made, seed=6, std=0.2)
        made.eval().save_pretrained(tmp_path / "theirs")
        loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "theirs")
        torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
        merged = copy.deepcopy(loaded).merge_and_unload()
        torch.testing.assert_close(output(merged, inputs), output(made.merge_and_unload(), inputs), atol=ATOL,
                                   rtol=1e-4)


def test_over_a_4bit_base_equals_peft_bnb_layer_and_unloads_exactly():
    """QLoRA-style: HiRA over bitsandbytes nf4 layers (``W0`` read dequantised) gives peft's ``hira.Linear4bit``
    logits on the same tensors; ``merge_and_unload`` returns dense ``nn.Linear`` layers with the adapted logits."""
    pytest.importorskip("bitsandbytes")
    from deltatune.quantization import quantize

    inputs, targets = make_inputs("llama"), ["q_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize(tiny_llama(), "nf4")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.HiraConfig(r=4, init_weights=False,
                                                                          target_modules=targets)).eval()
        ours = get_peft_model(base, HiraConfig(r=4, init_weights=False, target_modules=targets)).eval()
        layer = ours.base_model.model.model.layers[0].self_attn.q_proj
        assert repr(layer).startswith("hira.Linear4bit")
        theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".hira_" in k}, strict=False)
        got = output(ours, inputs)
        torch.testing.assert_close(got, output(theirs, inputs), atol=ATOL, rtol=0)
        plain = ours.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(output(plain, inputs), got, atol=ATOL, rtol=1e-4)
