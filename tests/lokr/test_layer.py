"""LoKr layers against reference math (Kronecker blocks assembled by hand), the factorisation rule, every
storage variant (whole / decomposed factors, effective conv), inits, rank dropout, merge/unmerge, several
adapters, and the model-level contract (tiny Llama, GPT-2, BERT).
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import output, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import LoKrConfig, get_peft_model
from deltatune.errors import ConfigError
from deltatune.lokr import factorization

ATOL = 1e-5


def _layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    # Convs 8 -> 12 channels: both sides have several Kronecker factorisations. Conv1D keeps transformers' init.
    geometry = {"dims": (8, 12)} if kind.startswith("conv") and kind != "conv1D" else {}
    return layer_and_input(kind, conv1D_weight_std=None, **geometry)


def _adapt(kind: str, **config):
    model, x = _layer_and_input(kind)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, LoKrConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _factor(layer: nn.Module, i: str, name: str) -> torch.Tensor:
    """``W_i`` from whichever tensors hold it (whole, ``a @ b``, or a core with two mode matrices)."""
    if name in getattr(layer, f"lokr_w{i}"):
        return getattr(layer, f"lokr_w{i}")[name]
    a, b = getattr(layer, f"lokr_w{i}_a")[name], getattr(layer, f"lokr_w{i}_b")[name]
    if i == "2" and name in layer.lokr_t2:
        core = layer.lokr_t2[name]                           # (r, r, *k)
        return (a.T @ core.permute(2, 3, 0, 1) @ b).permute(2, 3, 0, 1)  # (b, d, *k)
    return a @ b


def _delta_reference(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``s · W1 ⊗ W2`` assembled block by block: block ``(i, k)`` of ``ΔW`` is ``s · W1[i, k] · W2``."""
    base = layer.base_layer
    shape = base.weight.shape[::-1] if isinstance(base, Conv1D) else base.weight.shape
    w1, w2 = _factor(layer, "1", name), _factor(layer, "2", name)
    a, c = w1.shape
    b, d = w2.shape[:2]
    kernel = shape[2:]
    if w2.dim() == 2 and kernel:  # kernel flattened into W2b: unflatten to (b, d, *k)
        w2 = w2.reshape(b, d // math.prod(kernel), *kernel)
        d = w2.shape[1]
    elif w2.dim() == len(shape) + 1:  # Conv1d core stored as (r, r, k, 1), as PEFT: drop the trailing 1
        w2 = w2.reshape(b, d, *kernel)
    delta = torch.zeros(a * b, c * d, *kernel)
    for i in range(a):
        for k in range(c):
            delta[i * b:(i + 1) * b, k * d:(k + 1) * d] = w1[i, k] * w2
    return layer.scaling[name] * delta.reshape(shape)




def test_factorization_matches_peft_and_examples():
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16)
    assert factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)
    for n in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16, 0, 1000):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)


# (id, kind, config, which tensors exist)
VARIANTS = [
    ("linear-whole", "linear", {"r": 8}, {"lokr_w1", "lokr_w2"}),
    ("linear-w2-lowrank", "linear", {"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("linear-both-lowrank", "linear", {"r": 1, "decompose_both": True, "decompose_factor": 8},
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ("linear-factor", "linear", {"r": 8, "decompose_factor": 2}, {"lokr_w1", "lokr_w2"}),
    ("conv1D-whole", "conv1D", {"r": 8}, {"lokr_w1", "lokr_w2"}),
    ("conv2d-whole", "conv2d", {"r": 8}, {"lokr_w1", "lokr_w2"}),
    ("conv2d-flat", "conv2d", {"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("conv2d-effective", "conv2d", {"r": 1, "use_effective_conv2d": True},
     {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ("conv2d-groups", "conv2d_groups", {"r": 1, "use_effective_conv2d": True},
     {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ("conv1d-flat", "conv1d", {"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("conv1d-effective", "conv1d", {"r": 1, "use_effective_conv2d": True},
     {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
]


@pytest.mark.parametrize("kind,config,tensors", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_matches_reference(kind, config, tensors):
    pm, layer, x = _adapt(kind, **config)
    present = {n for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
    assert present == tensors
    expected = base_output(layer, x, _delta_reference(layer))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_conv1d_whole_w2_uses_peft_layout():
    """Conv1d with a whole 3-D ``W2``: PEFT 0.21 forms ``torch.kron`` of a 2-D and a 3-D tensor (``W1`` acts as
    ``(1, a, c)``); deltatune keeps that layout so files from either library compute the same function."""
    pm, layer, x = _adapt("conv1d", r=8)
    w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
    assert w2.dim() == 3
    delta = (torch.kron(w1[None], w2) * layer.scaling["default"]).reshape(layer.base_layer.weight.shape)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("init,zeroed", [(True, "lokr_w1"), ("lycoris", "lokr_w2")])
@pytest.mark.parametrize("kind,config,tensors", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_identity_at_init_then_merge(kind, config, tensors, init, zeroed):
    pm, layer, x = _adapt(kind, init_weights=init, **config)
    key = zeroed if zeroed in tensors else (f"{zeroed}_a" if init is True else f"{zeroed}_b")
    assert torch.count_nonzero(getattr(layer, key)["default"]) == 0
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    with torch.no_grad():
        getattr(layer, key)["default"].normal_(std=0.5)
    expected = output(pm, {"x": x})
    assert (expected - base_output(layer, x)).abs().max() > 1e-4
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout(scale):
    pm, layer, x = _adapt("linear", r=8, rank_dropout=0.5, rank_dropout_scale=scale)
    pm.train()
    full = F.linear(x, _delta_reference(layer))
    torch.manual_seed(5)
    got = output(pm, {"x": x}) - base_output(layer, x)
    kept = [got[..., o].abs().max() > 1e-6 for o in range(12)]
    assert 0 < sum(kept) < 12
    factor = 12 / sum(kept) if scale else 1.0
    for o in range(12):
        want = full[..., o] * factor if kept[o] else torch.zeros_like(full[..., o])
        torch.testing.assert_close(got[..., o], want, atol=ATOL, rtol=1e-5)


def test_two_active_adapters_add():
    pm, layer, x = _adapt("linear", r=8)
    pm.add_adapter("other", LoKrConfig(target_modules=["layer"], r=1, alpha=3, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    delta = _delta_reference(layer, "default") + _delta_reference(layer, "other")
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, delta), atol=ATOL, rtol=1e-5)


def test_config_fields_and_defaults_match_peft():
    ours, theirs = LoKrConfig().to_dict(), peft.LoKrConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": -1}, "positive"), ({"init_weights": "pissa"}, "lycoris"),
                                       ({"decompose_factor": 2.5}, "decompose_factor"),
                                       ({"rank_pattern": {"q": 0}}, "rank_pattern")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        LoKrConfig(**bad)


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: LoKrConfig(r=4, alpha=8, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", tiny_gpt2, "gpt2", lambda: LoKrConfig(r=1, alpha=2, target_modules=["c_attn", "c_proj"])),
    ("bert", tiny_bert, "bert", lambda: LoKrConfig(r=2, alpha=4, decompose_both=True, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    check_model_contract(factory, kind, config, "lokr_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", LoKrConfig(r=2),
                       LoKrConfig(r=8, alpha=2, target_modules=["k_proj", "up_proj"], init_weights="lycoris"), tmp_path)
