"""Trainable tokens (and LoRA's ``trainable_token_indices``): reference math, the model-level contract on tiny
Llama, GPT-2 (tied head) and BERT, two adapters, errors."""

from __future__ import annotations

import pytest
import torch
from support.family_checks import check_model_contract, check_two_adapters
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama

import deltatune
from deltatune import LoraConfig, TrainableTokensConfig, get_peft_model
from deltatune.errors import ConfigError

IDS = [27, 70, 98, 48, 36, 61]  # tokens of make_inputs(): the rows matter for the logits


def test_rows_replaced_and_tied_head_follows():
    model = get_peft_model(tiny_gpt2(), TrainableTokensConfig(token_indices=[27, 70]))
    gpt = model.base_model.model
    emb = gpt.transformer.wte
    new = torch.randn(2, 32)
    with torch.no_grad():
        emb.trainable_tokens_delta["default"].copy_(new)
    weight = emb.base_layer.weight.detach().clone()
    weight[[27, 70]] = new
    ids = torch.tensor([[27, 5, 70]])
    torch.testing.assert_close(emb(ids), weight[ids])
    h = torch.randn(1, 3, 32)
    torch.testing.assert_close(gpt.lm_head(h), h @ weight.T)  # the tied head uses the same rows
    assert gpt.lm_head.trainable_tokens_delta is emb.trainable_tokens_delta
    base = emb.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(emb.base_layer.weight, weight)
    model.unmerge_adapter()
    torch.testing.assert_close(emb.base_layer.weight, base)


@pytest.mark.parametrize("factory,kind,kwargs", [
    (tiny_llama, "llama", {}),
    (tiny_gpt2, "gpt2", {}),
    (tiny_bert, "bert", {"target_modules": ["word_embeddings"]}),
], ids=["llama", "gpt2-tied", "bert"])
def test_model_contract(factory, kind, kwargs, tmp_path):
    check_model_contract(factory, kind, lambda: TrainableTokensConfig(token_indices=IDS, **kwargs),
                         "trainable_tokens_", tmp_path)


@pytest.mark.parametrize("factory,kind", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")], ids=["llama", "gpt2-tied"])
def test_lora_with_token_indices_contract(factory, kind, tmp_path):
    check_model_contract(factory, kind, lambda: LoraConfig(r=4, trainable_token_indices=IDS),
                         ("lora_", ".trainable_tokens_delta."), tmp_path)


def test_two_adapters(tmp_path):
    check_two_adapters(tiny_gpt2, "gpt2", TrainableTokensConfig(token_indices=[27, 70]),
                       TrainableTokensConfig(token_indices=[98, 48]), tmp_path)


def test_lora_token_adapter_removed_with_the_adapter():
    inputs = make_inputs("gpt2")
    ref = output(tiny_gpt2(), inputs)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, trainable_token_indices={"wte": [27, 70]}))
    assert type(model.base_model.model.lm_head).__name__ == "TokenAdapterWrapper"  # tied head follows
    perturb_trainable(model)
    assert (output(model, inputs) - ref).abs().max() > 1e-3
    plain = model.unload()
    assert isinstance(plain.transformer.wte, torch.nn.Embedding) and isinstance(plain.lm_head, torch.nn.Linear)
    torch.testing.assert_close(output(plain, inputs), ref)


def test_overlapping_adapters_and_bad_indices_are_refused():
    with pytest.raises(ConfigError, match="token_indices is empty"):  # PEFT's rule: refused when applied
        get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[]))
    with pytest.raises(ConfigError, match="outside"):
        get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[5, 1000]))
    model = get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[27, 70]))
    model.add_adapter("b", TrainableTokensConfig(token_indices=[70]))
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ConfigError, match="disjoint"):
        output(model, make_inputs("llama"))
    assert isinstance(model.peft_config["b"], deltatune.TrainableTokensConfig)
