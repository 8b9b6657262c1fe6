"""VeRA layers against reference math, the shared seeded projections (one copy per model, frozen, sliced per
layer, saved or regenerated), identity at init, merge/unmerge, several adapters, and the model-level contract
(tiny Llama, GPT-2, BERT).
"""

from __future__ import annotations

import json
import math
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import VeraConfig, get_peft_model
from deltatune.errors import ConfigError, TargetModuleError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|save_projection)")


class Two(nn.Module):
    """Two layers of different sizes (the projections are sized for the larger of each side)."""

    def __init__(self, second: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12)
        self.b = second if second is not None else nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _adapt(second: nn.Module | None = None, **config):
    config.setdefault("r", 6)
    config.setdefault("init_weights", False)
    pm = get_peft_model(Two(second), VeraConfig(target_modules=["a", "b"], **config))
    pm.eval()
    return pm, pm.base_model.model


def _reference_layer(layer: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, name="default"):
    """``W x + b + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))``."""
    base = layer.base_layer
    w = base.weight.T if isinstance(base, Conv1D) else base.weight
    out_f, in_f = w.shape
    lb, ld = layer.vera_lambda_b[name], layer.vera_lambda_d[name]
    return F.linear(x, w, base.bias) + lb * ((ld * (x @ A[:, :in_f].T)) @ B[:out_f].T)


def test_matches_reference_and_projections_are_shared():
    pm, model = _adapt()
    x = torch.randn(3, 5, 16)
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert A.shape == (6, 16) and B.shape == (20, 6)  # (r, max in), (max out, r)
    assert model.a.vera_A is model.b.vera_A is pm.base_model.vera_A  # one copy, referenced by the layers
    assert not A.requires_grad and not any("vera_A" in n or "vera_B" in n for n, _ in pm.named_parameters())
    assert sum(".vera_A." in k for k in pm.state_dict()) == 1  # not duplicated per layer
    h = _reference_layer(model.a, x, A, B)
    torch.testing.assert_close(output(pm, {"x": x}), _reference_layer(model.b, h, A, B), atol=ATOL, rtol=1e-5)


def test_conv1D_matches_reference():
    torch.manual_seed(1)
    conv = Conv1D(20, 12)
    nn.init.normal_(conv.weight, std=0.2)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        pm, model = _adapt(conv)
    x = torch.randn(3, 5, 16)
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    h = _reference_layer(model.a, x, A, B)
    torch.testing.assert_close(output(pm, {"x": x}), _reference_layer(model.b, h, A, B), atol=ATOL, rtol=1e-5)
    assert pm.peft_config["default"].fan_in_fan_out is True


def test_projections_are_seeded_kaiming_uniform():
    pm, _ = _adapt(projection_prng_key=3)
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert A.abs().max() <= math.sqrt(6 / 16) and B.abs().max() <= math.sqrt(6 / 6)
    assert A.abs().max() > 0.8 * math.sqrt(6 / 16)  # uniform over the whole range, not e.g. normal(0, small)
    again, _ = _adapt(projection_prng_key=3)
    other, _ = _adapt(projection_prng_key=4)
    assert torch.equal(again.base_model.vera_A["default"], A)
    assert not torch.equal(other.base_model.vera_A["default"], A)
    # the same draw as PEFT's (so save_projection=False files regenerate identical projections)
    theirs = peft.get_peft_model(Two(), peft.VeraConfig(r=6, target_modules=["a", "b"], projection_prng_key=3))
    assert torch.equal(theirs.base_model.vera_A["default"], A)
    assert torch.equal(theirs.base_model.vera_B["default"], B)


def test_identity_at_init_and_merge():
    pm, model = _adapt(init_weights=True, d_initial=0.2)
    x = torch.randn(3, 5, 16)
    ref = Two()(x)
    assert torch.equal(model.a.vera_lambda_b["default"], torch.zeros(12))
    assert torch.equal(model.a.vera_lambda_d["default"], torch.full((6,), 0.2))
    torch.testing.assert_close(output(pm, {"x": x}), ref, atol=0, rtol=0)
    perturb_trainable(pm, std=0.5)
    expected = output(pm, {"x": x})
    assert (expected - ref).abs().max() > 1e-3
    w0 = model.a.base_layer.weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(model.a.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_two_adapters_have_their_own_projections_and_add():
    pm, model = _adapt()
    # Same seed (PEFT's rule for a model's VeRA adapters), smaller r and other targets: the first adapter's
    # projections, the very tensors (as PEFT), of which it uses the first r rows / columns.
    pm.add_adapter("wide", VeraConfig(target_modules=["b"], r=3, init_weights=False))
    assert pm.base_model.vera_A["wide"] is pm.base_model.vera_A["default"]
    assert pm.base_model.vera_B["wide"] is pm.base_model.vera_B["default"]
    pm.base_model.set_adapter(["default", "wide"])
    x = torch.randn(2, 16)
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    A2, B2 = A[:3], B[:, :3]
    h = _reference_layer(model.a, x, A, B)
    expected = _reference_layer(model.b, h, A, B) + (_reference_layer(model.b, h, A2, B2, "wide")
                                                      - F.linear(h, model.b.base_layer.weight, model.b.base_layer.bias))
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.delete_adapter("wide")
    assert "wide" not in pm.base_model.vera_A and "wide" not in pm.base_model.vera_B
    assert not any(".wide" in k for k in pm.state_dict())


@pytest.mark.parametrize("save_projection", [True, False])
def test_file_holds_projection_only_when_asked(save_projection, tmp_path):
    pm = get_peft_model(tiny_llama(), VeraConfig(r=8, save_projection=save_projection))
    perturb_trainable(pm, std=0.3)
    pm.eval()
    inputs = make_inputs("llama")
    out = output(pm, inputs)
    pm.save_pretrained(tmp_path)
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys and "base_model.vera_B" in keys) == save_projection
    assert not any(k.endswith((".vera_A", ".vera_B")) and k.startswith("base_model.model") for k in keys)
    with open(os.path.join(tmp_path, "adapter_config.json")) as fh:
        assert json.load(fh)["save_projection"] is save_projection
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, inputs), out, atol=1e-6, rtol=0)


def test_file_projection_is_what_loads(tmp_path):
    """With ``save_projection`` the file's A and B are used, not a regeneration from the seed."""
    pm = get_peft_model(tiny_llama(), VeraConfig(r=8, init_weights=False))
    with torch.no_grad():
        pm.base_model.vera_A["default"].mul_(-1.5)
    pm.eval()
    inputs = make_inputs("llama")
    out = output(pm, inputs)
    pm.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, inputs), out, atol=1e-6, rtol=0)


def test_bias_vera_only_trains_adapted_biases():
    pm = get_peft_model(tiny_gpt2(), VeraConfig(r=4, bias="vera_only"))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith("bias")}
    assert biases and all(".c_attn.base_layer.bias" in n for n in biases)
    assert trainable - biases and all("vera_lambda_" in n for n in trainable - biases)


def test_config_fields_and_defaults_match_peft():
    ours, theirs = VeraConfig().to_dict(), peft.VeraConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


@pytest.mark.parametrize("bad,match", [({"r": 0}, "positive"), ({"bias": "lora_only"}, "vera_only"),
                                       ({"vera_dropout": 1.5}, "vera_dropout")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        VeraConfig(**bad)


def test_embedding_is_refused_clearly():
    with pytest.raises(TargetModuleError, match="unsupported type"):
        get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["embed_tokens"]))


# ---- whole models --------------------------------------------------------------------------------

MODELS = [
    ("llama", tiny_llama, "llama", lambda: VeraConfig(r=8, task_type="CAUSAL_LM")),
    ("gpt2", tiny_gpt2, "gpt2", lambda: VeraConfig(r=8, target_modules=["c_attn", "c_fc"])),
    ("bert", tiny_bert, "bert", lambda: VeraConfig(r=8, task_type="SEQ_CLS", save_projection=False)),
]


@pytest.mark.parametrize("name,factory,kind,config", MODELS, ids=[m[0] for m in MODELS])
def test_model_contract(name, factory, kind, config, tmp_path):
    check_model_contract(factory, kind, config, "vera_lambda_", tmp_path)


def test_two_named_adapters(tmp_path):
    # The second adapter shares the first's projections (as PEFT), so its layers fit them and its r matches
    # (a file holding them then loads alone too)
    check_two_adapters(tiny_llama, "llama", VeraConfig(r=8),
                       VeraConfig(r=8, target_modules=["k_proj", "o_proj"]), tmp_path)
