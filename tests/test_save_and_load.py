"""deltatune.get_peft_model_state_dict / set_peft_model_state_dict: PEFT's signature and PEFT's file keys."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.errors import AdapterLoadError, AdapterNameError, ConfigError

peft = pytest.importorskip("peft")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def pair(**kw):
    """The same base wrapped by peft (with non-zero random LoRA B) and by deltatune (fresh)."""
    base = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or name.endswith(".bias"):
                p.normal_()
    ours = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(**cfg))
    return theirs, ours


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_round_trip_with_peft_keys_and_values(bias):
    theirs, ours = pair(bias=bias)
    want = peft.get_peft_model_state_dict(theirs)
    assert want and all(".default." not in k for k in want)
    result = deltatune.set_peft_model_state_dict(ours, want)
    assert result.missing_keys == [] and result.unexpected_keys == []
    got = deltatune.get_peft_model_state_dict(ours)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits)
    # peft's own function does not see deltatune's layers (it looks for its own classes): why ours exists.
    assert peft.get_peft_model_state_dict(ours) == {}


def test_state_dict_argument_and_adapter_name_as_peft():
    theirs, ours = pair()
    ours.add_adapter("other", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name="other"),
                                        adapter_name="other")
    got = deltatune.get_peft_model_state_dict(ours, adapter_name="other")
    want = peft.get_peft_model_state_dict(theirs, adapter_name="other")
    assert sorted(got) == sorted(want) and all(v.shape[0] == 2 or v.shape[1] == 2 for v in got.values())
    # A caller's state dict (e.g. gathered from FSDP shards) is read instead of the model's tensors.
    full = {k: v.clone() for k, v in ours.state_dict().items()}
    key = next(k for k in full if "lora_B.default" in k)
    full[key] = torch.full_like(full[key], 7.0)
    for lib, model in ((peft, theirs), (deltatune, ours)):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd[key] = torch.full_like(sd[key], 7.0)
        out = lib.get_peft_model_state_dict(model, sd)
        assert torch.equal(out[key.replace(".default", "")], sd[key])
    assert not torch.equal(ours.state_dict()[key], full[key])  # the model itself was not changed
    assert "state_dict" not in ours.__dict__


def test_refusals_are_one_line():
    theirs, ours = pair()
    sd = peft.get_peft_model_state_dict(theirs)
    with pytest.raises(AdapterNameError, match="no adapter named 'nope'"):
        deltatune.get_peft_model_state_dict(ours, adapter_name="nope")
    with pytest.raises(ConfigError, match="use peft.get_peft_model_state_dict"):
        deltatune.get_peft_model_state_dict(theirs)
    bad = dict(sd)
    k = next(iter(bad))
    bad[k] = torch.zeros(3, 3)
    before = {n: v.clone() for n, v in ours.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        deltatune.set_peft_model_state_dict(ours, bad)
    assert all(torch.equal(v, before[n]) for n, v in ours.state_dict().items())  # nothing loaded half
