"""BitFit: reference math, the model-level contract (tiny Llama, GPT-2, BERT), merging into a bias-free layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.models import Holder, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from deltatune import BitFitConfig, get_peft_model


@pytest.mark.parametrize("bias", [True, False])
def test_linear_math_merge_unmerge(bias):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias)
    w, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    model = get_peft_model(Holder(lin), BitFitConfig(target_modules=["layer"]))
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), F.linear(x, w, b))
    delta = model.base_model.model.layer.bitfit_bias["default"]
    with torch.no_grad():
        delta.normal_()
    want = F.linear(x, w, b) + delta
    torch.testing.assert_close(model(x), want)
    model.merge_adapter()
    torch.testing.assert_close(model(x), want)
    model.unmerge_adapter()
    base = model.base_model.model.layer.base_layer
    assert (base.bias is None) == (not bias), "unmerge must restore a bias-free layer"
    if bias:
        torch.testing.assert_close(base.bias, b)
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(x), want)
    assert isinstance(plain.layer, nn.Linear)


@pytest.mark.parametrize("factory,kind,kwargs", [
    (tiny_llama, "llama", {}),
    (tiny_gpt2, "gpt2", {}),
    (tiny_bert, "bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value", "dense", "LayerNorm"]}),
], ids=["llama", "gpt2", "bert"])
def test_model_contract(factory, kind, kwargs, tmp_path):
    check_model_contract(factory, kind, lambda: BitFitConfig(**kwargs), "bitfit_", tmp_path)


def test_two_adapters(tmp_path):
    check_two_adapters(tiny_gpt2, "gpt2", BitFitConfig(), BitFitConfig(target_modules=["c_fc"]), tmp_path)


def test_default_is_all_linear_but_head():
    model = get_peft_model(tiny_llama(), BitFitConfig())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)  # 7 projections per layer
