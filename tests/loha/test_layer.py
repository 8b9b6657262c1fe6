"""LoHa layers against reference math (Linear, Conv1D, Conv1d/2d, effective conv), identity at init,
rank/module dropout, merge/unmerge, several adapters, and the model-level contract (tiny Llama, GPT-2, BERT).

References are computed here from the layer's tensors with plain matrix products (the effective-conv core
contracted with ``@`` over permuted axes, not the einsum the layer uses).
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import output, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import LoHaConfig, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5


def _layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    # conv2d: 4 -> 6 channels (not the default 3 -> 5); Conv1D keeps transformers' weight init.
    geometry = {"conv2d": {"dims": (4, 6)}}.get(kind, {})
    return layer_and_input(kind, conv1D_weight_std=None, **geometry)


def _adapt(kind: str, **config):
    model, x = _layer_and_input(kind)
    config.setdefault("r", 3)
    config.setdefault("alpha", 6)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, LoHaConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _delta_reference(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``s · (W1a W1b) ⊙ (W2a W2b)`` in the base weight's ``(out, in, *k)`` layout."""
    base = layer.base_layer
    shape = base.weight.shape[::-1] if isinstance(base, Conv1D) else base.weight.shape
    factors = []
    for i in ("1", "2"):
        a, b = getattr(layer, f"hada_w{i}_a")[name], getattr(layer, f"hada_w{i}_b")[name]
        if name in getattr(layer, f"hada_t{i}"):
            t = getattr(layer, f"hada_t{i}")[name]             # (r, r, k1, k2)
            full = a.T @ t.permute(2, 3, 0, 1) @ b              # (k1, k2, out, in)
            factors.append(full.permute(2, 3, 0, 1).reshape(shape))
        else:
            factors.append((a @ b).reshape(shape))
    return layer.scaling[name] * factors[0] * factors[1]




KINDS = ["linear", "conv1D", "conv1d", "conv2d", "conv2d_groups", "conv2d_1x1"]


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, effective):
    pm, layer, x = _adapt(kind, use_effective_conv2d=effective)
    uses_core = effective and kind in ("conv1d", "conv2d", "conv2d_groups")  # 1x1 kernels stay flat (PEFT)
    assert ("default" in layer.hada_t1) == uses_core
    if kind == "linear":
        assert layer.hada_w1_a["default"].shape == (12, 3) and layer.hada_w1_b["default"].shape == (3, 16)
    expected = base_output(layer, x, _delta_reference(layer))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_merge(kind, effective):
    pm, layer, x = _adapt(kind, use_effective_conv2d=effective, init_weights=True)
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    assert torch.count_nonzero(layer.hada_w1_a["default"]) > 0
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    # then a non-zero adapter: merged == unmerged, and unmerge restores W
    with torch.no_grad():
        layer.hada_w2_b["default"].normal_(std=0.5)
    expected = output(pm, {"x": x})
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_two_active_adapters_add():
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", LoHaConfig(target_modules=["layer"], r=2, alpha=1, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    delta = _delta_reference(layer, "default") + _delta_reference(layer, "other")
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


def test_rank_dropout_drops_output_rows_and_rescales():
    """Training with ``rank_dropout``: each output row of ``ΔW`` is either dropped or scaled by 1/mean(keep)."""
    pm, layer, x = _adapt("linear", rank_dropout=0.5)
    pm.train()
    full = F.linear(x, _delta_reference(layer))               # (..., out) contribution without dropout
    torch.manual_seed(3)
    got = output(pm, {"x": x}) - base_output(layer, x)
    kept = [(got[..., o] - 0).abs().max() > 1e-6 for o in range(12)]
    assert 0 < sum(kept) < 12, "with p=0.5 over 12 rows some rows must be kept and some dropped"
    scale = 12 / sum(kept)
    for o in range(12):
        want = full[..., o] * scale if kept[o] else torch.zeros_like(full[..., o])
        torch.testing.assert_close(got[..., o], want, atol=ATOL, rtol=1e-5)
    pm.eval()  # no dropout at inference
    torch.testing.assert_close(output(pm, {"x": x}) - base_output(layer, x), full, atol=ATOL, rtol=1e-5)


def test_module_dropout_skips_the_adapter_at_its_rate():
    pm, layer, x = _adapt("linear", module_dropout=0.3)
    base = base_output(layer, x)
    pm.train()
    torch.manual_seed(0)
    skipped = sum(bool(torch.equal(output(pm, {"x": x}), base)) for _ in range(400))
    assert 0.2 < skipped / 400 < 0.4
    pm.eval()
    assert not torch.equal(output(pm, {"x": x}), base)


def test_rank_and_alpha_patterns():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pm = get_peft_model(model, LoHaConfig(target_modules=["0", "1"], r=4, alpha=4, rank_pattern={"1": 2},
                                          alpha_pattern={"0": 12}))
    first, second = pm.base_model.model[0], pm.base_model.model[1]
    assert first.r["default"] == 4 and first.scaling["default"] == 3.0
    assert second.r["default"] == 2 and second.scaling["default"] == 2.0
    assert second.hada_w1_a["default"].shape == (8, 2)


def test_config_fields_and_defaults_match_peft():
    ours, theirs = LoHaConfig().to_dict(), peft.LoHaConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 0}, "positive"), ({"rank_dropout": 1.0}, "rank_dropout"),
                                       ({"module_dropout": -0.1}, "module_dropout"),
                                       ({"layers_pattern": "layers"}, "layers_to_transform")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        LoHaConfig(**bad)


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: LoHaConfig(r=4, alpha=8, task_type="CAUSAL_LM")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: LoHaConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"])),
    ("bert", tiny_bert, "bert", lambda: LoHaConfig(r=4, alpha=8, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    check_model_contract(factory, kind, config, "hada_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", LoHaConfig(r=2),
                       LoHaConfig(r=4, alpha=2, target_modules=["q_proj", "down_proj"]), tmp_path)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d"])
def test_gradients_match_plain_autograd_of_the_reference(kind):
    """The flat ΔW recomputes its two products in backward: the factor gradients equal autograd's through
    ``s · (W1a W1b) ⊙ (W2a W2b)`` and the input gradient equals the reference layer's."""
    pm, layer, x = _adapt(kind)
    pm.train()
    x = x.clone().requires_grad_()
    out = pm(x=x)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    factors = [getattr(layer, f"hada_w{i}_{j}")["default"] for i in "12" for j in "ab"]
    got = [f.grad.clone() for f in factors] + [x.grad.clone()]
    refs = [f.detach().clone().requires_grad_() for f in factors]
    x_ref = x.detach().clone().requires_grad_()
    shape = layer.base_layer.weight.shape[::-1] if kind == "conv1D" else layer.base_layer.weight.shape
    delta = layer.scaling["default"] * (refs[0] @ refs[1]) * (refs[2] @ refs[3])
    (base_output(layer, x_ref, delta.reshape(shape)) * weight).sum().backward()
    for g, ref in zip(got, [r.grad for r in refs] + [x_ref.grad]):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradcheck(
        lambda *w: layer_delta(*w, scale=layer.scaling["default"]),
        [f.detach().double().requires_grad_() for f in factors])


def layer_delta(w1a, w1b, w2a, w2b, scale):
    from deltatune.loha.layer import HadamardDelta

    return HadamardDelta.apply(w1a, w1b, w2a, w2b, scale)


def test_trains_under_bf16_autocast():
    """The trainer runs bf16 autocast on CPU: ΔW is built in fp32 and the factors get fp32 gradients."""
    pm, layer, x = _adapt("linear")
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(x=x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for i in "12":
        for j in "ab":
            grad = getattr(layer, f"hada_w{i}_{j}")["default"].grad
            assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
    want = base_output(layer, x, _delta_reference(layer)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pm(x=x).float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
