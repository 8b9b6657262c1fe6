"""(IA)³ layers against reference math, identity at init, exact merge/unmerge, several adapters, and the
model-level contract (tiny Llama, GPT-2, BERT): see ``family_checks``.

Each layer is wrapped in a one-module model (``Holder.layer``) and adapted with ``get_peft_model``; the
reference outputs are computed here from the layer's tensors with plain ``torch.nn.functional`` calls.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import layer_and_input
from support.models import Holder, make_inputs, output, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import IA3Config, get_peft_model
from deltatune.errors import ConfigError, MergeError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*fan_in_fan_out")


def _layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    return layer_and_input(kind)


def _adapt(kind: str, feedforward: bool, **config):
    model, x = _layer_and_input(kind)
    pm = get_peft_model(model, IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [],
                                         **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _randomise(layer: nn.Module, name: str = "default", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vec = layer.ia3_l[name]
    with torch.no_grad():
        vec.copy_(1 + 0.5 * torch.randn(vec.shape, generator=g))
    return vec.detach()


def _reference(layer: nn.Module, x: torch.Tensor, l_in: torch.Tensor | None, l_out: torch.Tensor | None):
    """``base(x ⊙ l_in) ⊙ l_out`` with the vectors as flat ``(features,)`` tensors."""
    base = layer.base_layer
    conv = isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    shape = (1, -1) + (1,) * (x.dim() - 2) if conv else (-1,)
    if l_in is not None:
        x = x * l_in.reshape(shape)
    if isinstance(base, Conv1D):
        y = x @ base.weight + base.bias
    elif conv:
        y = base._conv_forward(x, base.weight, base.bias)
    else:
        y = F.linear(x, base.weight, base.bias)
    return y if l_out is None else y * l_out.reshape(shape)


KINDS = ["linear", "conv1D", "conv1d", "conv2d", "conv2d_groups", "conv3d"]


# ---- output vs reference math --------------------------------------------------------------------

@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, feedforward):
    pm, layer, x = _adapt(kind, feedforward)
    vec = _randomise(layer)
    n_in, n_out = layer.in_features, layer.out_features
    if kind in ("linear", "conv1D"):
        assert vec.shape == ((1, n_in) if feedforward else (n_out, 1))  # PEFT's layouts
    else:
        assert vec.shape[:2] == ((1, n_in) if feedforward else (1, n_out))
    expected = _reference(layer, x, vec.flatten() if feedforward else None, None if feedforward else vec.flatten())
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind, feedforward):
    pm, layer, x = _adapt(kind, feedforward)
    assert torch.equal(layer.ia3_l["default"], torch.ones_like(layer.ia3_l["default"]))
    torch.testing.assert_close(output(pm, {"x": x}), _reference(layer, x, None, None), atol=0, rtol=0)


def test_init_false_is_random():
    pm, layer, x = _adapt("linear", False, init_ia3_weights=False)
    assert (layer.ia3_l["default"] - 1).abs().max() > 0.1


def test_two_active_adapters_multiply():
    """An output-scaling and a feedforward adapter on one layer: ``(W (x ⊙ l_ff) + b) ⊙ l_out``."""
    pm, layer, x = _adapt("linear", False)
    pm.add_adapter("ff", IA3Config(target_modules=["layer"], feedforward_modules=["layer"]))
    l_out, l_ff = _randomise(layer, "default", 1), _randomise(layer, "ff", 2)
    pm.base_model.set_adapter(["default", "ff"])
    expected = _reference(layer, x, l_ff.flatten(), l_out.flatten())
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


# ---- merging ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge(kind, feedforward):
    pm, layer, x = _adapt(kind, feedforward)
    vec = _randomise(layer)
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    expected = output(pm, {"x": x})
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    # merged weight = W scaled along the output (or input) axis
    if kind == "linear":
        want = w0 * vec  # (1, in) scales the columns (feedforward), (out, 1) the rows
        torch.testing.assert_close(layer.base_layer.weight, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.base_layer.bias, b0 if feedforward else b0 * vec.flatten())
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, b0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_unmerge_is_exact_with_zero_entries(feedforward):
    """``W ⊙ 0`` cannot be divided back: the layer restores the saved weight and bias bit for bit."""
    pm, layer, x = _adapt("linear", feedforward)
    _randomise(layer)
    with torch.no_grad():
        layer.ia3_l["default"].view(-1)[:3] = 0.0
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    expected = output(pm, {"x": x})
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert not layer._merge_cache


def test_disable_while_merged_restores_base():
    pm, layer, x = _adapt("conv2d", False)
    _randomise(layer)
    base_out = _reference(layer, x, None, None)
    pm.merge_adapter()
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, {"x": x}), base_out, atol=ATOL, rtol=1e-5)
    assert not layer.merged


def test_safe_merge_refuses_nan_and_changes_nothing():
    pm, layer, x = _adapt("linear", False)
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_merge_matches_peft_merge():
    """PEFT's merge of the same vector gives the same weight and bias."""
    torch.manual_seed(0)
    ours = get_peft_model(Holder(nn.Linear(8, 6)), IA3Config(target_modules=["layer"], feedforward_modules=[]))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(Holder(nn.Linear(8, 6)), peft.IA3Config(target_modules=["layer"],
                                                                          feedforward_modules=[]))
    vec = 1 + torch.randn(6, 1)
    with torch.no_grad():
        ours.base_model.model.layer.ia3_l["default"].copy_(vec)
        theirs.base_model.model.layer.ia3_l["default"].copy_(vec)
    ours.merge_adapter()
    theirs.merge_adapter()
    a, b = ours.base_model.model.layer.base_layer, theirs.base_model.model.layer.base_layer
    torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)
    torch.testing.assert_close(a.bias, b.bias, atol=0, rtol=0)


# ---- config ------------------------------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = IA3Config().to_dict(), peft.IA3Config().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


def test_feedforward_must_be_a_target():
    with pytest.raises(ConfigError, match="^`feedforward_modules` should be a subset of `target_modules`$"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_default_targets_and_feedforward_per_architecture():
    pm = get_peft_model(tiny_llama(), IA3Config())
    config = pm.peft_config["default"]
    assert config.target_modules == {"k_proj", "v_proj", "down_proj"}
    assert config.feedforward_modules == {"down_proj"}
    down = pm.base_model.model.model.layers[0].mlp.down_proj
    k = pm.base_model.model.model.layers[0].self_attn.k_proj
    assert down.is_feedforward["default"] and down.ia3_l["default"].shape == (1, 64)
    assert not k.is_feedforward["default"] and k.ia3_l["default"].shape == (16, 1)


def test_missing_feedforward_for_unknown_architecture_is_a_clear_error():
    model, _ = _layer_and_input("linear")
    with pytest.raises(ConfigError, match="feedforward_modules"):
        get_peft_model(model, IA3Config(target_modules=["layer"]))


def test_gpt2_sets_fan_in_fan_out():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        pm = get_peft_model(tiny_gpt2(), IA3Config())
    assert pm.peft_config["default"].fan_in_fan_out is True


def test_embedding_is_refused_clearly():
    with pytest.raises(deltatune.TargetModuleError, match="unsupported type"):
        get_peft_model(tiny_llama(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: IA3Config(task_type="CAUSAL_LM")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: IA3Config(task_type="CAUSAL_LM")),
    ("bert", tiny_bert, "bert", lambda: IA3Config(task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    check_model_contract(factory, kind, config, "ia3_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", IA3Config(),
                       IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]), tmp_path)


def test_only_active_adapter_trains():
    pm = get_peft_model(tiny_llama(), IA3Config())
    pm.add_adapter("other", IA3Config())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l.default" in n for n in trainable)
    pm.set_adapter("other")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l.other" in n for n in trainable)
    inputs = make_inputs("llama")
    assert output(pm, inputs).shape == (2, 7, 100)
