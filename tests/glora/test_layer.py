"""GLoRA layers against the paper's ``W_eff``/``b_eff`` (formed in float64 here), against peft's own layer for every
combination of the three parametrisation settings (same seed: same draws, same tensors, same output and merge),
identity at init, merge/unmerge of weight and bias against the kept originals, several adapters, PEFT's refusals,
files both ways with peft (BERT: biases, so ``C, D, E`` train), and the model-level contract (GPT-2's ``Conv1D``,
two named adapters on the tiny Llama).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import built_like_peft, layer_and_input
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import GloraConfig, GloraLayer, GloraLinear, GloraModel, PeftModel, get_peft_model
from deltatune.errors import ConfigError, MergeError

ATOL = 1e-5
# Every value of each setting at least once, with a bias and without (all 72 combinations agreed with peft when
# this was written; six keep the test fast)
SETTINGS = [(("lora", "lora", "constant"), True), (("lora", "lora", "constant"), False),
            (("vector", "vector", "vector"), True), (("constant", "none", "none"), True),
            (("none", "lora", "vector"), True), (("vector", "none", "constant"), False)]


def _adapt(kind: str, settings=("lora", "lora", "constant"), **config):
    model, x = layer_and_input(kind)
    a_b, c, d_e = settings
    config = {"r": 3, "config_A_B": a_b, "config_C": c, "config_D_E": d_e, "init_weights": False, **config}
    pm = get_peft_model(model, GloraConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _values(layer: GloraLayer, name: str) -> dict[str, torch.Tensor]:
    """``A ... E`` in float64 from the stored tensors (``Xd @ Xu``, ``X``, ``X[0]`` or zeros)."""
    out = {}
    for m in "ABCDE":
        path = getattr(layer, f"glora_{m}")[name]
        tensors = dict(path.named_parameters()) | dict(path.named_buffers())
        if "Xd" in tensors:
            out[m] = tensors["Xd"].double() @ tensors["Xu"].double()
        elif "zeros" in tensors:
            out[m] = tensors["zeros"].double()
        else:
            x = tensors["X"].double()
            out[m] = x[0] if x.shape == (1,) else x
    return out


def _effective(layer: GloraLayer, names=("default",)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_eff = W0 + Σ (W0 ⊙ A + B)``, ``b_eff = b0 + Σ (b0 ⊙ D + E + W0 C)``: ``(out, in)`` and ``(out,)``."""
    base = layer.base_layer
    w0 = (base.weight.T if isinstance(base, Conv1D) else base.weight).detach().double()
    b0 = None if base.bias is None else base.bias.detach().double()
    w, b = w0.clone(), None if b0 is None else b0.clone()
    for name in names:
        v = _values(layer, name)
        w = w + w0 * v["A"] + v["B"]
        if b0 is not None:
            b = b + b0 * v["D"] + v["E"] + (w0 @ v["C"]).squeeze(-1)
    return w.float(), None if b is None else b.float()


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
@pytest.mark.parametrize("settings", [("lora", "lora", "constant"), ("vector", "vector", "vector"),
                                      ("constant", "none", "none"), ("none", "lora", "vector")])
def test_matches_reference_and_merges_weight_and_bias(kind, settings):
    pm, layer, x = _adapt(kind, settings)
    assert isinstance(layer, GloraLinear) and isinstance(pm.base_model, GloraModel)
    w, b = _effective(layer)
    expected = F.linear(x, w, b)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    weight0 = layer.base_layer.weight.detach().clone()
    bias0 = None if b is None else layer.base_layer.bias.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w.T if kind == "conv1D" else w, atol=1e-6, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, weight0)
    assert b is None or torch.equal(layer.base_layer.bias, bias0)
    plain = pm.merge_and_unload()
    assert type(plain.layer) is type(layer.base_layer)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


def test_equals_peft_layer_for_each_setting():
    """Each value of config_A_B, config_C, config_D_E, with and without a bias: under one seed both libraries draw
    the same tensors under the same names, and give the same output, merged weight and merged bias."""
    x = torch.randn(3, 6)
    for settings, bias in SETTINGS:
        a_b, c, d_e = settings
        config = {"target_modules": ["layer"], "r": 2, "config_A_B": a_b, "config_C": c, "config_D_E": d_e,
                  "init_weights": False}
        torch.manual_seed(0)
        ours, theirs, layer, their_layer = built_like_peft(
            Holder(nn.Linear(6, 4, bias=bias)), GloraConfig(**config), peft.GloraConfig(**config), settings)
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=1e-5, msg=str(settings))
        ours.merge_adapter()
        theirs.merge_adapter()
        for attr in ("weight", "bias") if bias else ("weight",):
            torch.testing.assert_close(getattr(layer.base_layer, attr), getattr(their_layer.base_layer, attr),
                                       atol=1e-6, rtol=1e-5, msg=f"{settings} {attr}")


def test_identity_at_init_and_trainable_tensors():
    pm, layer, x = _adapt("linear", ("lora", "vector", "vector"), init_weights=True)
    assert torch.equal(output(pm, {"x": x}), layer.base_layer(x))
    assert layer.glora_A["default"].Xu.any() and not layer.glora_A["default"].Xd.any()
    trainable = {n.split("layer.")[-1] for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"glora_A.default.Xd", "glora_A.default.Xu", "glora_B.default.Xd", "glora_B.default.Xu",
                         "glora_C.default.X", "glora_D.default.X", "glora_E.default.X"}
    perturb_trainable(pm, std=0.2)
    pm.train()
    pm(x=x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters() if p.requires_grad)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_bias_glora_only_trains_the_adapted_biases():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pm = get_peft_model(model, GloraConfig(target_modules=["0"], bias="glora_only"))
    assert pm.base_model.model[0].base_layer.bias.requires_grad and not pm.base_model.model[1].bias.requires_grad


def test_two_active_adapters_and_merges_against_the_originals():
    """``W0 + Σ_i (W0 ⊙ A_i + B_i)`` and ``b0 + Σ_i (b0 ⊙ D_i + E_i + W0 C_i)``, active together and merged one at a
    time (each term against the unmerged originals, as PEFT); unmerging restores both bit for bit."""
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", GloraConfig(target_modules=["layer"], r=2, config_A_B="vector", config_D_E="vector",
                                        init_weights=False))
    layer.set_adapter(["default", "other"])
    w, b = _effective(layer, ("default", "other"))
    torch.testing.assert_close(output(pm, {"x": x}), F.linear(x, w, b), atol=ATOL, rtol=1e-5)
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    layer.merge(adapter_names=["default"])
    layer.merge(adapter_names=["other"])
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.bias, b, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert layer._weight_before_merge is None and layer._bias_before_merge is None


def test_safe_merge_refuses_a_non_finite_bias_and_unmerge_without_originals_refuses():
    pm, layer, x = _adapt("linear", ("lora", "lora", "vector"))
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.glora_E["default"].X[0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert not layer.merged and layer._weight_before_merge is None
    layer.merged_adapters.append("default")  # marked merged behind merge()'s back: nothing was kept
    with pytest.raises(MergeError, match="the base weight before the merge was not kept"):
        layer.unmerge()


def test_adapter_stays_float32_over_a_half_precision_base():
    layer = GloraLayer(nn.Linear(8, 4).to(torch.bfloat16))
    layer.update_layer("default", r=2, init_weights=False)
    assert layer.glora_A["default"].Xd.dtype == torch.float32
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = GloraConfig().to_dict(), peft.GloraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "GLORA" and GloraConfig(target_modules=["a", "b"]).target_modules == {"a", "b"}


@pytest.mark.parametrize("bad,match", [
    ({"config_A_B": "full"}, "Invalid config_A_B value: 'full'. Valid values are: constant, lora, none, vector."),
    ({"config_C": "constant"}, "Invalid config_C value: 'constant'. Valid values are: lora, none, vector."),
    ({"config_D_E": "lora"}, "Invalid config_D_E value: 'lora'. Valid values are: constant, none, vector."),
])
def test_refusals_begin_with_peft_s_sentence(bad, match):
    with pytest.raises(ValueError, match=match):
        peft.GloraConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        GloraConfig(**bad)


def test_unsupported_layer_type_and_bias_are_refused():
    with pytest.raises(ValueError, match="Conv2d"):
        get_peft_model(Holder(nn.Conv2d(2, 2, 1)), GloraConfig(target_modules=["layer"]))
    with pytest.raises(ConfigError, match="Requested bias: some, is not implemented."):
        GloraConfig(bias="some")


# ---- whole models and files ----------------------------------------------------------------------

def test_files_cross_both_ways_with_peft(tmp_path):
    """BERT (``nn.Linear`` with biases): ``C, D, E`` train and cross too; ``"none"`` paths' zero buffers are in both
    libraries' files."""
    inputs = make_inputs("bert")
    config = {"r": 2, "config_C": "lora", "config_D_E": "vector", "target_modules": ["query", "value"]}
    ours = get_peft_model(tiny_bert(), GloraConfig(**config))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

    made = peft.get_peft_model(tiny_bert(), peft.GloraConfig(**config, config_A_B="none"))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "theirs")
    assert isinstance(loaded.base_model, GloraModel)
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
    merged = copy.deepcopy(loaded).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), output(made.merge_and_unload(), inputs), atol=ATOL, rtol=1e-4)


def test_gpt2_conv1d_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: GloraConfig(r=2, config_D_E="vector", target_modules=["c_attn"]),
                         "glora_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", GloraConfig(r=2, task_type="CAUSAL_LM"),
                       GloraConfig(r=4, config_A_B="vector", target_modules=["q_proj", "down_proj"]), tmp_path)
