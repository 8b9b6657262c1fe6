"""LN tuning: reference math, the model-level contract (tiny Llama, GPT-2, BERT), two adapters, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.models import Holder, make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import LNTuningConfig, get_peft_model
from deltatune.errors import ConfigError, MergeError


def test_layernorm_copy_math_and_merge():
    torch.manual_seed(0)
    model = get_peft_model(Holder(nn.LayerNorm(8)), LNTuningConfig(target_modules=["layer"]))
    x = torch.randn(3, 8)
    base = F.layer_norm(x, (8,))
    torch.testing.assert_close(model(x), base)  # identity at init (γ=1, β=0 copied)
    copy = model.base_model.model.layer.ln_tuning_layers["default"]
    with torch.no_grad():
        copy.weight.uniform_(0.5, 1.5)
        copy.bias.normal_()
    want = F.layer_norm(x, (8,), copy.weight, copy.bias)
    torch.testing.assert_close(model(x), want)
    model.merge_adapter()
    torch.testing.assert_close(model.base_model.model.layer.base_layer.weight, copy.weight)
    torch.testing.assert_close(model(x), want)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.layer.base_layer.weight, torch.ones(8))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base)


@pytest.mark.parametrize("factory,kind,kwargs", [
    (tiny_llama, "llama", {}),
    (tiny_gpt2, "gpt2", {}),
    (tiny_bert, "bert", {"target_modules": ["LayerNorm"], "task_type": "SEQ_CLS"}),
], ids=["llama", "gpt2", "bert"])
def test_model_contract(factory, kind, kwargs, tmp_path):
    check_model_contract(factory, kind, lambda: LNTuningConfig(**kwargs), "ln_tuning_", tmp_path)


def test_two_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", LNTuningConfig(), LNTuningConfig(target_modules=["norm"]), tmp_path)


def test_one_adapter_at_a_time():
    model = get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["norm"]))
    model.add_adapter("b", LNTuningConfig(target_modules=["norm"]))
    perturb_trainable(model)
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ConfigError, match="one adapter at a time"):
        output(model, make_inputs("llama"))
    with pytest.raises(MergeError, match="one adapter at a time"):
        model.merge_adapter()


def test_trainable_parameters_are_the_norms():
    model = get_peft_model(tiny_llama(), LNTuningConfig())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == (2 * 2 + 1) * 32  # two norms per layer, two layers, the final norm; hidden 32
    assert isinstance(model.peft_config["default"], deltatune.LNTuningConfig)


def test_an_architecture_without_defaults_gets_every_norm():
    """BERT is not in PEFT's LN-tuning table: deltatune targets every normalisation layer (PEFT would ask
    for target_modules)."""
    bert = tiny_bert()
    norms = [n for n, m in bert.named_modules() if isinstance(m, nn.LayerNorm)]
    model = get_peft_model(bert, LNTuningConfig(task_type="FEATURE_EXTRACTION"))
    assert set(model.peft_config["default"].target_modules) == {"LayerNorm"}
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if type(m).__name__ == "LNTuningLayer")
    assert adapted == sorted(norms) and len(norms) == 2 * 2 + 1  # two per layer, two layers, the embeddings'
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == len(norms) * 2 * bert.config.hidden_size  # weight and bias of each
