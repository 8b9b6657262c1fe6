"""Super-Tuning layers against ``W + S + (α / r) B A`` with the support picked here by sorting ``|W|``, against peft's
own layer for each setting (same seed: same positions, values, LoRA pair, output, merged weight), identity at init,
files both ways with peft (with and without the positions in the file), PEFT's refusals, and the model-level contract
(GPT-2's ``Conv1D``, two named adapters on the tiny Llama).
"""

from __future__ import annotations

import peft
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, built_like_peft, layer_and_input
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import PeftModel, SupertuningConfig, SupertuningLayer, SupertuningModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5
# (r, select_top, init_weights): Super and Supra, both ends of the magnitudes
SETTINGS = [(None, True, False), (None, False, False), (2, True, False), (3, False, True)]


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config = {"sparsity": 0.8, "init_weights": False, **config}
    pm = get_peft_model(model, SupertuningConfig(target_modules=["layer"], **config)).eval()
    return pm, pm.base_model.model.layer, x


def _effective(layer: SupertuningLayer, sparsity: float, top: bool) -> torch.Tensor:
    """``W + S + (α / r) B A: (out, in)``; the support re-derived from ``|W|`` (a stable sort, no ties here)."""
    base = layer.base_layer
    w = (base.weight.T if isinstance(base, Conv1D) else base.weight).detach().double()
    count = int(w.numel() * (1 - sparsity))
    order = torch.argsort(w.abs().flatten(), descending=top, stable=True)[:count]
    assert set(order.tolist()) == set(layer.supertuning_indices["default"].long().tolist())
    by_position = dict(zip(layer.supertuning_indices["default"].tolist(),
                           layer.supertuning_values["default"].detach().double().tolist(), strict=True))
    s = torch.zeros(w.numel(), dtype=torch.float64)
    for position in order.tolist():
        s[position] = by_position[position]
    effective = w + s.view_as(w)
    if layer.supertuning_rank["default"]:
        A = layer.supertuning_lora_A["default"].weight.detach().double()
        B = layer.supertuning_lora_B["default"].weight.detach().double()
        effective = effective + layer.supertuning_lora_alpha["default"] / layer.supertuning_rank["default"] * B @ A
    return effective.float()


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
@pytest.mark.parametrize("r,top", [(None, True), (2, False)])
def test_matches_the_formula_and_merges(kind, r, top):
    pm, layer, x = _adapt(kind, r=r, select_top=top)
    assert isinstance(pm.base_model, SupertuningModel)
    assert layer.supertuning_values["default"].shape == (int(12 * 16 * 0.2),)
    w = _effective(layer, 0.8, top)
    expected = F.linear(x, w, layer.base_layer.bias)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    plain = pm.merge_and_unload()
    assert type(plain.layer) is type(layer.base_layer)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


def test_equals_peft_layer_for_each_setting():
    x = torch.randn(3, 6)
    for r, top, init in SETTINGS:
        config = {"target_modules": ["layer"], "sparsity": 0.7, "r": r, "select_top": top, "init_weights": init}
        torch.manual_seed(0)
        ours, theirs, layer, their_layer = built_like_peft(
            Holder(nn.Linear(6, 5)), SupertuningConfig(**config), peft.SupertuningConfig(**config), config)
        if init:
            perturb_trainable(ours, seed=3, std=0.2)
            their_layer.load_state_dict(layer.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=1e-5, msg=str(config))
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=1e-6, rtol=1e-5)


def test_identity_at_init_and_trainable_tensors():
    pm, layer, x = _adapt("linear", r=2, init_weights=True)
    assert torch.equal(output(pm, {"x": x}), layer.base_layer(x))
    assert layer.supertuning_lora_alpha["default"] == 4.0  # PEFT's default 2 r
    trainable = {n.split("layer.")[-1] for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"supertuning_values.default", "supertuning_lora_A.default.weight",
                         "supertuning_lora_B.default.weight"}
    pm.train()
    pm(x=x).square().sum().backward()
    assert layer.supertuning_values["default"].grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_a_hooked_base_runs_itself_with_the_same_result():
    pm, layer, x = _adapt("linear", r=2)
    expected = output(pm, {"x": x})
    calls = []
    layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    assert calls


# ---- config and PEFT's refusals ----------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = SupertuningConfig().to_dict(), peft.SupertuningConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "SUPERTUNING" and SupertuningConfig(r=3).lora_alpha == 6


@pytest.mark.parametrize("bad,match", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0.0, 1.0\), got 1.0"),
    ({"r": 0}, "r must be a positive integer or None, got 0"),
    ({"lora_alpha": 8}, "lora_alpha is set but r is None"),
    ({"r": 2, "lora_dropout": 1.0}, r"lora_dropout must be in \[0.0, 1.0\), got 1.0"),
])
def test_refusals_begin_with_peft_s_sentence(bad, match):
    with pytest.raises(ValueError, match=match):
        peft.SupertuningConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        SupertuningConfig(**bad)


def test_refusals_when_building():
    match = "sparsity=0.99 leaves no trainable entries for a weight with 16 elements"
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(Holder(nn.Linear(4, 4)), peft.SupertuningConfig(target_modules=["layer"]))
    with pytest.raises(ConfigError, match=match):
        get_peft_model(Holder(nn.Linear(4, 4)), SupertuningConfig(target_modules=["layer"]))
    pm = get_peft_model(Holder(nn.Linear(8, 8)), SupertuningConfig(target_modules=["layer"], sparsity=0.5))
    with pytest.warns(UserWarning, match="save_precomputed_indices=False"):
        other = SupertuningConfig(target_modules=["layer"], sparsity=0.5, save_precomputed_indices=False)
    with pytest.raises(ValueError, match=r"must be saved for all adapters or none, .*: \[False, True\]"):
        pm.add_adapter("other", other)
    with pytest.raises(ValueError, match="Conv2d"):
        get_peft_model(Holder(nn.Conv2d(2, 2, 1)), SupertuningConfig(target_modules=["layer"]))


# ---- whole models and files ----------------------------------------------------------------------

@pytest.mark.parametrize("save_indices", [True, False])
def test_files_cross_both_ways_with_peft(tmp_path, save_indices):
    """The tiny Llama: ours loads in peft and theirs in ours, logits equal; without positions in the file both
    libraries recompute the same ones from the base."""
    inputs = make_inputs("llama")
    config = {"sparsity": 0.9, "r": 2, "target_modules": ["q_proj", "v_proj"],
              "save_precomputed_indices": save_indices}
    ours = get_peft_model(tiny_llama(), SupertuningConfig(**config))
    perturb_trainable(ours, seed=5, std=0.2)
    ours.eval().save_pretrained(tmp_path / "ours")
    keys = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert any(k.endswith("supertuning_indices") for k in keys) is save_indices
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

    made = peft.get_peft_model(tiny_llama(), peft.SupertuningConfig(**config, select_top=False))
    perturb_trainable(made, seed=6, std=0.2)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)


def test_gpt2_conv1d_model_contract(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: SupertuningConfig(sparsity=0.9, r=2, target_modules=["c_attn"]),
                         "supertuning_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", SupertuningConfig(sparsity=0.9, task_type="CAUSAL_LM"),
                       SupertuningConfig(sparsity=0.8, r=2, select_top=False, target_modules=["q_proj", "down_proj"]),
                       tmp_path)
