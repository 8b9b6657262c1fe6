"""SHiRA layers against reference math (Linear, Conv1D), PEFT's mask draw and layer on the same tensors, files both
ways with peft (random and custom masks), identity at init, merge, several adapters, PEFT's refusals, and the
model-level contract (tiny Llama, GPT-2).

The reference ``ΔW`` is built here entry by entry from the layer's values and positions (a Python loop), not by
the layer's ``index_put``.
"""

from __future__ import annotations

from contextlib import nullcontext

import peft
import pytest
import torch
from peft.tuners.shira.mask_functions import random_mask as peft_random_mask
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import output, tiny_gpt2, tiny_llama
from torch import nn

from deltatune import PeftModel, ShiraConfig, ShiraLayer, get_peft_model
from deltatune.errors import ConfigError
from deltatune.shira.mask_functions import random_indices, random_mask

ATOL = 1e-5


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config.setdefault("r", 2)
    config.setdefault("random_seed", 5)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, ShiraConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _delta_reference(layer: ShiraLayer, name: str = "default") -> torch.Tensor:
    """``ΔW: (out, in)``, ``s · w_k`` at ``(i_k, j_k)``, filled one entry at a time."""
    delta = torch.zeros(layer.out_features, layer.in_features)
    rows, cols = layer.shira_indices[name].tolist()
    for k, (i, j) in enumerate(zip(rows, cols)):
        delta[i, j] += layer.scaling[name] * layer.shira_weight[name][k].item()
    return delta


class MLP(nn.Module):
    """Two linear layers (PEFT adapts nn.Linear only), so files cross both ways."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x).relu())


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))


# ---- the mask ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 0, 42])
@pytest.mark.parametrize("shape", [(12, 16), (20, 10), (6, 20)])
def test_mask_is_peft_draw(shape, seed):
    base = nn.Linear(shape[1], shape[0])
    theirs = peft_random_mask(base, 2, random_seed=seed)
    assert torch.equal(random_mask(base, 2, random_seed=seed), theirs)
    rows, cols = torch.where(theirs == 1.0)
    assert torch.equal(random_indices(*shape, 2, seed), torch.stack([rows, cols]).to(torch.int32))
    assert int(theirs.sum()) == 2 * (shape[0] + shape[1])


def test_seed_sets_the_positions():
    a, b, c = (random_indices(12, 16, 2, s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- the layer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
def test_matches_reference(kind):
    pm, layer, x = _adapt(kind)
    assert layer.shira_weight["default"].shape == (2 * (12 + 16),)
    assert layer.shira_indices["default"].dtype == torch.int32
    assert layer.fan_in_fan_out == (kind == "conv1D")
    expected = base_output(layer, x, _delta_reference(layer))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    # get_delta_weight is shaped like the base weight ((in, out) for Conv1D)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.base_layer.weight.shape
    assert torch.count_nonzero(delta) <= 2 * (12 + 16)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_identity_at_init_and_merge(kind):
    pm, layer, x = _adapt(kind, init_weights=True)
    assert torch.count_nonzero(layer.shira_weight["default"]) == 0
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    with torch.no_grad():
        layer.shira_weight["default"].normal_(std=0.5)
    expected = output(pm, {"x": x})
    assert (expected - base_output(layer, x)).abs().max() > 1e-3
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_equals_peft_layer_on_the_same_tensors():
    ours = get_peft_model(MLP(), ShiraConfig(r=2, target_modules=["lin0", "lin1"], random_seed=3,
                                             init_weights=False)).eval()
    theirs = peft.get_peft_model(MLP(), peft.ShiraConfig(r=2, target_modules=["lin0", "lin1"], random_seed=3)).eval()
    for name in ("lin0", "lin1"):
        mine, peft_layer = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert torch.equal(mine.shira_indices["default"], peft_layer.shira_indices["default"])
        with torch.no_grad():
            peft_layer.shira_weight["default"].copy_(mine.shira_weight["default"])
        torch.testing.assert_close(mine.get_delta_weight("default"),
                                   peft_layer.get_delta_weight("default").to_dense(), atol=0, rtol=0)
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)


def test_two_active_adapters_add():
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", ShiraConfig(target_modules=["layer"], r=1, random_seed=9, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    delta = _delta_reference(layer, "default") + _delta_reference(layer, "other")
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


def test_only_the_values_train_and_set_scale():
    pm, layer, x = _adapt("linear")
    output_before = output(pm, {"x": x})
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["base_model.model.layer.shira_weight.default"]
    pm.base_model.model.layer(x).sum().backward()
    grad = layer.shira_weight["default"].grad
    rows, cols = layer.shira_indices["default"].long()
    # dL/dw_k = Σ over positions of x[..., j_k] (the loss sums every output)
    torch.testing.assert_close(grad, x.reshape(-1, 16).sum(0)[cols], atol=1e-5, rtol=1e-5)
    layer.set_scale("default", 0.0)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=ATOL, rtol=0)
    layer.set_scale("default", 1.0)
    torch.testing.assert_close(output(pm, {"x": x}), output_before, atol=0, rtol=0)


# ---- config and refusals -------------------------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = ShiraConfig().to_dict(), peft.ShiraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key
    assert ShiraConfig().mask_fn is random_mask
    with pytest.warns(UserWarning, match="is not recognized, please supply your own masking function"):
        assert ShiraConfig(mask_type="mine").mask_fn is None


@pytest.mark.parametrize("r,match", [(0, "`r` should be a positive integer value but the value passed is 0"),
                                     (8, "The set rank 8 results in more shira params than the total number")])
def test_peft_refusals(r, match):
    for lib in (peft, None):
        model, _ = layer_and_input("linear")  # 16 -> 12: r=8 asks for 224 of 192 values
        with pytest.raises(ValueError, match=match):
            if lib is peft:
                peft.get_peft_model(model, peft.ShiraConfig(r=r, target_modules=["layer"]))
            else:
                get_peft_model(model, ShiraConfig(r=r, target_modules=["layer"]))
    with pytest.raises(ConfigError, match="use r <= 6"):
        get_peft_model(layer_and_input("linear")[0], ShiraConfig(r=7, target_modules=["layer"]))


def test_custom_mask_function_needs_the_right_count():
    def every_other(base_layer, r, **kwargs):
        return (torch.arange(base_layer.weight.numel()) % 2 == 0).view_as(base_layer.weight).to(torch.float32)

    config = ShiraConfig(r=2, mask_type="every_other", target_modules=["layer"], inference_mode=True)
    config.mask_fn = every_other
    with pytest.raises(ConfigError, match="The SHiRA indices and weights are not the same dimensions"):
        get_peft_model(layer_and_input("linear")[0], config)  # 96 ones, r=2 needs 56


# ---- files both ways with peft -------------------------------------------------------------------

def _first_k_mask(base_layer, r, **kwargs):
    """A deterministic custom mask: the first r · (out + in) entries in row-major order."""
    out_f, in_f = base_layer.weight.shape
    mask = torch.zeros(out_f * in_f)
    mask[: r * (out_f + in_f)] = 1
    return mask.view(out_f, in_f)


@pytest.mark.parametrize("mask", ["random", "first_k"])
def test_files_cross_both_ways_with_peft(mask, tmp_path):
    def configs(config_cls):
        config = config_cls(r=2, target_modules=["lin0", "lin1"], random_seed=11, mask_type=mask,
                                 init_weights=False)
        if mask != "random":
            config.mask_fn = _first_k_mask
        return config

    with pytest.warns(UserWarning, match="not recognized") if mask != "random" else nullcontext():
        ours = get_peft_model(MLP(), configs(ShiraConfig))
        theirs = peft.get_peft_model(MLP(), configs(peft.ShiraConfig))
    ours.eval()
    theirs.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")

    mine, peft_file = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(
        tmp_path / "theirs/adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in peft_file.items()}
    for key in (k for k in mine if k.endswith("shira_indices")):
        assert torch.equal(mine[key], peft_file[key]), key  # same seed / mask: same positions

    # deltatune's file in peft, peft's file in deltatune: equal logits
    peft_loaded = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_loaded(X), ours(X), atol=1e-6, rtol=0)
    ours_loaded = PeftModel.from_pretrained(MLP(), tmp_path / "theirs").eval()
    torch.testing.assert_close(ours_loaded(X), theirs(X), atol=1e-6, rtol=0)


def test_peft_file_with_other_positions_is_loaded_as_filed(tmp_path):
    """A file's positions win over the config's seed (a PEFT adapter trained with a custom mask loads exactly)."""
    theirs = peft.get_peft_model(MLP(), peft.ShiraConfig(r=2, target_modules=["lin0"], random_seed=1,
                                                         init_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(MLP(), tmp_path, adapter_name="x")
    assert torch.equal(ours.base_model.model.lin0.shira_indices["x"],
                       theirs.base_model.model.lin0.shira_indices["default"])
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: ShiraConfig(r=4, random_seed=0, task_type="CAUSAL_LM")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: ShiraConfig(r=4, target_modules=["c_attn", "c_fc"])),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True") if name == "gpt2" else nullcontext():
        check_model_contract(factory, kind, config, "shira_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", ShiraConfig(r=4, task_type="CAUSAL_LM"),
                       ShiraConfig(r=2, random_seed=3, task_type="CAUSAL_LM"), tmp_path)
