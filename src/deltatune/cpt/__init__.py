"""CPT (context-aware prompt tuning): the config, the prompt encoder, the tuner, and the registry entry.

A soft prompt made of a few-shot context's own embeddings plus a bounded trained delta, with a loss on the
context's labels too; it rides on :mod:`deltatune.prompt`'s soft-prompt machinery.
"""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.cpt.config import CPTConfig
from deltatune.cpt.encoder import CPTEmbedding
from deltatune.cpt.tuner import CPTTuner
from deltatune.registry import Hooks, Method


def _make_encoder(config: CPTConfig, word_embeddings: nn.Module) -> CPTEmbedding:
    return CPTEmbedding(config, word_embeddings)


CPT = Method(
    peft_type=PeftType.CPT, config_cls=CPTConfig, lr_scale=30.0,
    hooks=Hooks(make_prompt_encoder=_make_encoder, peft_tuner=CPTTuner, peft_table_cls=CPTEmbedding),
    cli_names={"cpt": {}},
)

__all__ = ["CPTConfig", "CPTEmbedding", "CPTTuner"]
