"""BOFT layers against reference math (dense permutation matrices and block-diagonals, as the paper writes
them), against PEFT's own multi-factor path (its CUDA block-diagonal kernel emulated on CPU), identity at
init, dropout, merge/unmerge, several adapters, config parity, and the model-level contract (tiny Llama,
GPT-2, BERT).
"""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.boft import layer as peft_boft
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, layer_and_input
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import BOFTConfig, get_peft_model
from deltatune.boft.layer import butterfly_permutation
from deltatune.errors import ConfigError

ATOL = 1e-5


def _layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    # A 2x2 conv2d on 4 channels (BOFT's blocks); Conv1D keeps transformers' weight init.
    geometry = {"conv2d": {"dims": (4, 6), "kernel_size": 2, "size": (7, 7)}}.get(kind, {})
    return layer_and_input(kind, conv1D_weight_std=None, **geometry)


def _adapt(kind: str, **config):
    model, x = _layer_and_input(kind)
    config.setdefault("boft_block_size", 2)
    config.setdefault("init_weights", False)
    pm = get_peft_model(model, BOFTConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    p[torch.arange(len(perm)), perm] = 1
    return p


def _reference_rotation(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``R = B_(m-1) ··· B_0``, ``B_i = P_i diag(C_i) P_iᵀ``, with dense matrices and ``inv``."""
    gen = layer.boft_R[name].detach().double()
    m, _, b, _ = gen.shape
    d = layer.rotated_features
    total = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        blocks = []
        eye = torch.eye(b, dtype=torch.float64)
        for a in gen[i]:
            s = (a - a.T) / 2
            blocks.append((eye - s) @ torch.linalg.inv(eye + s))
        perm = torch.arange(d) if m == 1 else butterfly_permutation(d, b * 2 ** i, b // 2)
        p = _perm_matrix(perm)
        total = p @ torch.block_diag(*blocks) @ p.T @ total
    return total.float()


def _reference_out(layer: nn.Module, x: torch.Tensor, rot: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    scale = scale.reshape(-1)
    if isinstance(base, nn.Conv2d):
        w = (base.weight.reshape(base.out_channels, -1) @ rot.T) * scale[:, None]
        return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight
    return F.linear(x @ rot, weight) * scale + base.bias


def test_butterfly_permutation_is_peft_s():
    for d, num, size, factors in ((16, 8, 2, 3), (32, 4, 8, 2), (24, 6, 4, 2), (64, 16, 4, 4)):
        for i in range(factors):
            theirs = peft_boft.BOFTLayer.block_butterfly_perm(None, d, num // 2 ** i, size // 2, factors - 1)
            ours = torch.arange(d) if i == 0 else butterfly_permutation(d, size * 2 ** i, size // 2)
            assert torch.equal(ours, theirs), (d, num, size, i)


@pytest.mark.parametrize("factors", [1, 2, 3])
@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d"])
def test_matches_reference(kind, factors):
    pm, layer, x = _adapt(kind, boft_n_butterfly_factor=factors)
    assert layer.boft_R["default"].shape[0] == factors
    expected = _reference_out(layer, x, _reference_rotation(layer), layer.boft_s["default"].detach())
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d"])
def test_identity_at_init_then_merge_equals_unmerged(kind):
    pm, layer, x = _adapt(kind, boft_n_butterfly_factor=2, init_weights=True)
    assert torch.count_nonzero(layer.boft_R["default"]) == 0
    assert torch.equal(layer.boft_s["default"], torch.ones_like(layer.boft_s["default"]))
    base = layer.base_layer(x)
    torch.testing.assert_close(output(pm, {"x": x}), base, atol=1e-6, rtol=0)
    with torch.no_grad():
        layer.boft_R["default"].normal_(std=0.3)
        layer.boft_s["default"].normal_(mean=1.0, std=0.2)
    expected = output(pm, {"x": x})
    assert (expected - base).abs().max() > 1e-3
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)


def test_two_active_adapters_compose_as_peft_and_merge_to_the_same():
    pm, layer, x = _adapt("linear", boft_n_butterfly_factor=2)
    pm.add_adapter("other", BOFTConfig(target_modules=["layer"], boft_block_size=4, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    rot = _reference_rotation(layer, "other") @ _reference_rotation(layer, "default")  # x R_other R_default
    scale = layer.boft_s["default"].detach() * layer.boft_s["other"].detach()
    expected = _reference_out(layer, x, rot, scale)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_dropout_sets_blocks_of_one_factor_to_identity_when_training():
    pm, layer, x = _adapt("linear", boft_n_butterfly_factor=2, boft_dropout=0.5)
    pm.train()
    factors = layer._factors("default").detach()
    eye = torch.eye(2)
    dropped = [[bool(torch.equal(b, eye)) for b in f] for f in factors]
    assert sorted(sum(f) for f in dropped) == [0, 4], "int(0.5 * 8) blocks of exactly one factor"
    expected = output(pm.eval(), {"x": x})
    assert not any(any(torch.equal(b, eye) for b in f) for f in layer._factors("default").detach())
    pm.train()
    pm.merge_adapter()  # in training mode: the merge folds in every block, none dropped
    torch.testing.assert_close(output(pm.eval(), {"x": x}), expected, atol=ATOL, rtol=1e-5)


# ---- PEFT's multi-factor path: its CUDA block-diagonal kernel, emulated ------------------------------------


@pytest.fixture
def peft_with_butterflies(monkeypatch):
    """PEFT runs more than one butterfly factor only with its compiled CUDA kernel (without it, it silently uses
    one). Emulate the kernel, ``(N, D, b, b) -> (N, D·b, D·b)`` block-diagonals, so PEFT's own math runs here."""
    def block_diagonals(blocks):
        return torch.stack([torch.block_diag(*blocks[i]) for i in range(blocks.shape[0])])

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(peft_boft.FastBlockDiag, "apply", staticmethod(block_diagonals))


@pytest.mark.parametrize("factors,kwargs", [(2, {"boft_block_size": 4}), (3, {"boft_block_size": 2}),
                                            (2, {"boft_block_size": 0, "boft_block_num": 8})])
def test_multi_factor_files_cross_with_peft_both_ways(peft_with_butterflies, tmp_path, factors, kwargs):
    inputs = make_inputs("llama")
    common = {"boft_n_butterfly_factor": factors, "target_modules": ["q_proj", "down_proj"], **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.BOFTConfig(**common))
        assert theirs.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == factors
        perturb_trainable(theirs, std=0.2)
        theirs.eval().save_pretrained(tmp_path / "peft")
        peft_out = output(theirs, inputs)
        loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
        torch.testing.assert_close(output(loaded, inputs), peft_out, atol=ATOL, rtol=1e-5)

        ours = get_peft_model(tiny_llama(), BOFTConfig(**common))
        perturb_trainable(ours, std=0.2)
        ours.eval().save_pretrained(tmp_path / "dt")
        back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "dt").eval()
        torch.testing.assert_close(output(back, inputs), output(ours, inputs), atol=ATOL, rtol=1e-5)
        assert os.path.getsize(tmp_path / "dt" / "adapter_model.safetensors") > 0


def test_peft_cpu_files_hold_one_factor_and_load_as_such(tmp_path):
    """Without its CUDA kernel PEFT silently trains one butterfly factor but writes the configured count."""
    inputs = make_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                     target_modules=["q_proj"]))
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 1
    perturb_trainable(theirs, std=0.2)
    theirs.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds one factor"):
        ours = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert ours.peft_config["default"].boft_n_butterfly_factor == 1
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=ATOL, rtol=1e-5)


# ---- configs -------------------------------------------------------------------------------------------


def test_config_fields_and_defaults_match_peft():
    ours, theirs = BOFTConfig().to_dict(), peft.BOFTConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"boft_block_num": 4}, "exactly one"), ({"boft_block_size": 0}, "exactly one"),
                                       ({"boft_n_butterfly_factor": 0}, "positive"),
                                       ({"boft_dropout": 1.0}, "boft_dropout"), ({"bias": "oft_only"}, "bias")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        BOFTConfig(**bad)


@pytest.mark.parametrize("config,match", [({"boft_block_size": 5}, "not divisible"),
                                          ({"boft_block_size": 8, "boft_n_butterfly_factor": 3}, "multiple of 32"),
                                          ({"boft_block_size": 0, "boft_block_num": 3}, "not divisible")])
def test_shapes_that_do_not_fit_are_refused(config, match):
    model = Holder(nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, BOFTConfig(target_modules=["layer"], **config))
    assert isinstance(model.layer, nn.Linear)


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: BOFTConfig(task_type="CAUSAL_LM")),
    ("llama-butterfly", tiny_llama, "llama",
     lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: BOFTConfig(boft_block_size=4, target_modules=["c_attn", "c_fc"])),
    ("bert", tiny_bert, "bert", lambda: BOFTConfig(boft_block_size=0, boft_block_num=8, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: fan_in_fan_out follows Conv1D
        check_model_contract(factory, kind, config, "boft_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", BOFTConfig(boft_block_size=4),
                       BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"]),
                       tmp_path)
