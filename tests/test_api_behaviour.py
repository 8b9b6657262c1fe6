"""Layer/config-level behaviour that code written for Hugging Face PEFT relies on (issue 18): the exceptions PEFT
raises, and the public attributes of its layers, compared with peft itself."""

from __future__ import annotations

import sys
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.models import TwoLinear, tiny_llama  # noqa: E402

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("first,second", [("all", "lora_only"), ("lora_only", "lora_only"), ("lora_only", "all")])
def test_second_adapter_with_bias_refused_like_peft(first: str, second: str) -> None:
    theirs = peft.get_peft_model(TwoLinear(), peft.LoraConfig(r=2, target_modules=["a"], bias=first))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        theirs.add_adapter("two", peft.LoraConfig(r=2, target_modules=["b"], bias=second))

    ours = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["a"], bias=first))
    keys = set(ours.state_dict())
    with pytest.raises(ConfigError, match=r"'two' has bias=.*only one adapter per model may train biases"):
        ours.add_adapter("two", LoraConfig(r=2, target_modules=["b"], bias=second))
    assert list(ours.peft_config) == ["default"] and set(ours.state_dict()) == keys


def test_bias_none_beside_a_bias_adapter_accepted_like_peft() -> None:
    theirs = peft.get_peft_model(TwoLinear(), peft.LoraConfig(r=2, target_modules=["a"], bias="all"))
    theirs.add_adapter("two", peft.LoraConfig(r=2, target_modules=["b"]))
    ours = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["a"], bias="all"))
    ours.add_adapter("two", LoraConfig(r=2, target_modules=["b"]))
    assert sorted(ours.peft_config) == ["default", "two"]


def test_loading_a_second_bias_adapter_refused(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only one adapter per model may train biases"):
        model.load_adapter(str(tmp_path), adapter_name="again")
    assert list(model.peft_config) == ["default"]


# ---- in_features / out_features on LN-tuning and trainable-token layers (PEFT's public attributes) ----------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(10, 6)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv1d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.lin(self.ln(self.embed_tokens(x))).transpose(1, 2))


def _features(model: nn.Module, names: list[str]) -> dict[str, tuple]:
    return {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_ln_tuning_layers_expose_features_like_peft() -> None:
    from deltatune import LNTuningConfig

    names = ["ln", "lin", "embed_tokens", "conv"]
    theirs = peft.get_peft_model(Net(), peft.LNTuningConfig(target_modules=names)).base_model.model
    ours = get_peft_model(Net(), LNTuningConfig(target_modules=names)).base_model.model
    assert _features(ours, names) == _features(theirs, names) == {
        "ln": (None, None), "lin": (6, 5), "embed_tokens": (10, 6), "conv": (5, 3)}


def test_trainable_token_layers_expose_features_like_peft() -> None:
    from deltatune import TrainableTokensConfig

    theirs = peft.get_peft_model(Net(), peft.TrainableTokensConfig(token_indices=[1, 2])).base_model.model
    ours = get_peft_model(Net(), TrainableTokensConfig(token_indices=[1, 2])).base_model.model
    assert _features(ours, ["embed_tokens"]) == _features(theirs, ["embed_tokens"]) == {"embed_tokens": (10, 6)}
    tied = get_peft_model(tiny_llama_tied(), TrainableTokensConfig(token_indices=[1, 2])).base_model.model
    emb, head = tied.model.embed_tokens, tied.lm_head
    assert (emb.in_features, emb.out_features) == (100, 32) and (head.in_features, head.out_features) == (32, 100)


def tiny_llama_tied() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
