"""``LoraConfig(ensure_weight_tying=True)`` (PEFT 0.21): with tied word embeddings, an embedding trained through
``modules_to_save`` keeps ``lm_head`` tied to it (one tensor) while training, after save/load and after
``merge_and_unload``, as PEFT does; ``trainable_token_indices`` naming both tied layers ties them with equal ids
and refuses different ids."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import ConfigError

IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _train(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _head_and_embedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    inner = model.base_model.model
    return inner.get_output_embeddings().weight, inner.get_input_embeddings().weight


@pytest.mark.parametrize("saved", [["embed_tokens"], ["embed_tokens", "lm_head"], ["lm_head"]])
def test_modules_to_save_keeps_lm_head_tied_like_peft(saved: list[str], tmp_path) -> None:
    kw = dict(r=2, target_modules=["q_proj"], ensure_weight_tying=True)
    ours = get_peft_model(tied_llama(), LoraConfig(modules_to_save=list(saved), **kw))
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(modules_to_save=list(saved), **kw))
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
    original = tied_llama().lm_head.weight.detach().clone()
    for model in (ours, theirs):
        _train(model)
        head, emb = _head_and_embedding(model)
        assert head is emb  # one tensor, trained
        assert (head - original).abs().max() > 1e-3
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert sorted(files[0]) == sorted(files[1])
    expected = ours(input_ids=IDS).logits
    for directory in ("ours", "theirs"):
        back = PeftModel.from_pretrained(tied_llama(), tmp_path / directory, is_trainable=True)
        head, emb = _head_and_embedding(back)
        assert head is emb
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    theirs_back = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours")
    torch.testing.assert_close(theirs_back(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    _train(back, 1)  # the loaded pair keeps training as one tensor
    head, emb = _head_and_embedding(back)
    assert head is emb
    merged = back.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_without_ensure_weight_tying_the_copy_is_untied_like_peft() -> None:
    kw = dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    ours = get_peft_model(tied_llama(), LoraConfig(**kw))
    _train(ours)
    head, emb = _head_and_embedding(ours)
    assert head is not emb and torch.equal(head, tied_llama().lm_head.weight)


def test_trainable_token_indices_on_both_tied_layers() -> None:
    same = {"embed_tokens": [3, 4], "lm_head": [3, 4]}
    for ewt in (False, True):
        ours = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=same,
                                                       ensure_weight_tying=ewt))
        theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   trainable_token_indices=same,
                                                                   ensure_weight_tying=ewt))
        trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
        assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
        assert len(trainable) == 1  # one set of rows: lm_head follows the embedding
        _train(ours)
        inner = ours.base_model.model
        torch.testing.assert_close(inner.lm_head.token_adapter.weight_with(["default"]),
                                   inner.model.embed_tokens.token_adapter.weight_with(["default"]))
    different = {"embed_tokens": [3, 4], "lm_head": [3, 5]}
    with pytest.raises(ValueError, match="different token indices"):
        peft.get_peft_model(tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          trainable_token_indices=different, ensure_weight_tying=True))
    base = tied_llama()
    with pytest.raises(ConfigError, match=r"different token ids \(embed_tokens: \[3, 4\], lm_head: \[3, 5\]\)"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=different,
                                        ensure_weight_tying=True))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    untied = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                     trainable_token_indices=different))
    assert len([n for n, p in untied.named_parameters() if p.requires_grad and "lora_" not in n]) == 2


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj", "lm_head"]])
def test_lora_on_tied_embedding_with_ensure_weight_tying_refused(targets: list[str]) -> None:
    base = tied_llama()
    with pytest.raises(ConfigError, match="ensure_weight_tying=True with the embedding in target_modules"):
        get_peft_model(base, LoraConfig(r=2, target_modules=targets, ensure_weight_tying=True))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear  # the failed call left the model as it was


def test_ensure_weight_tying_without_tied_layers_warns() -> None:
    from helpers import tiny_llama  # tie_word_embeddings=False

    with pytest.warns(UserWarning, match="nothing to tie"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                ensure_weight_tying=True))
