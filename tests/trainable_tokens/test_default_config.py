"""``TrainableTokensConfig()`` builds like PEFT's (generic code makes default configs) and is refused, with the
fix, only when applied to a model without token ids."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_llama

from deltatune import LoraConfig, TrainableTokensConfig, get_peft_model
from deltatune.errors import ConfigError


def test_default_config_constructs_like_peft() -> None:
    from peft import TrainableTokensConfig as PeftTrainableTokensConfig

    ours, theirs = TrainableTokensConfig(), PeftTrainableTokensConfig()
    assert ours.token_indices == theirs.token_indices == []
    assert ours.target_modules is theirs.target_modules is None
    ours.token_indices = [3, 4]  # generic code fills the ids in afterwards; then it applies
    model = get_peft_model(tiny_llama(), ours)
    assert model.base_model.model.model.embed_tokens.token_indices["default"] == [3, 4]


@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter"])
def test_empty_token_indices_refused_when_applied(how: str) -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    if how == "get_peft_model":
        with pytest.raises(ConfigError, match=r"token_indices is empty.*token_indices=\[32000, 32001\]"):
            get_peft_model(base, TrainableTokensConfig())
        assert type(base.model.embed_tokens) is torch.nn.Embedding  # nothing was wrapped
    else:
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="token_indices is empty"):
            model.add_adapter("tokens", TrainableTokensConfig())
        assert list(model.peft_config) == ["default"]
        assert type(model.base_model.model.model.embed_tokens) is torch.nn.Embedding
    for k, v in base.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k])


def test_bad_ids_still_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="non-negative"):
        TrainableTokensConfig(token_indices=[-1])
