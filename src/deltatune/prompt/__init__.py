"""Virtual-token methods: prompt tuning, P-tuning, prefix tuning, multitask prompt tuning.

They train a few vectors instead of any weight: soft prompts in front of the input embeddings, or
key/value prefixes in front of every attention layer's cache. ``config.py`` holds the configs,
``encoders.py`` the trainable modules, ``tuner.py`` the ``PromptTuner`` a ``PeftModel`` delegates to (adapters,
forward, generate, files), and how the tokens go in: ``soft.py`` (input embeddings) or ``prefix.py`` (the
key/value cache), with ``inputs.py`` the bookkeeping both share.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from deltatune.config import PeftType
from deltatune.prompt.config import (
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from deltatune.prompt.encoders import (
    ENCODERS,
    MultitaskPromptEmbedding,
    PrefixEncoder,
    PromptEmbedding,
    PromptEncoder,
)
from deltatune.prompt.tuner import PromptTuner
from deltatune.registry import Hooks, Method


def _make_encoder(config: PromptLearningConfig, word_embeddings: nn.Module) -> nn.Module:
    return ENCODERS[type(config)](config, word_embeddings)


def _hooks(encoder: type[nn.Module]) -> Hooks:
    """PeftModel delegates to PromptTuner; ``encoder`` is the method's entry in PEFT's tuner table."""
    return Hooks(make_prompt_encoder=_make_encoder, peft_tuner=PromptTuner, peft_table_cls=encoder)


PROMPT_TUNING = Method(
    peft_type=PeftType.PROMPT_TUNING, config_cls=PromptTuningConfig, lr_scale=30.0,
    hooks=_hooks(PromptEmbedding), cli_names={"prompt_tuning": {}},
)
P_TUNING = Method(
    peft_type=PeftType.P_TUNING, config_cls=PromptEncoderConfig, lr_scale=30.0,
    hooks=_hooks(PromptEncoder), cli_names={"p_tuning": {}},
)
PREFIX_TUNING = Method(
    peft_type=PeftType.PREFIX_TUNING, config_cls=PrefixTuningConfig, lr_scale=30.0,
    hooks=_hooks(PrefixEncoder), cli_names={"prefix_tuning": {}},
)
MULTITASK_PROMPT_TUNING = Method(
    peft_type=PeftType.MULTITASK_PROMPT_TUNING, config_cls=MultitaskPromptTuningConfig, lr_scale=30.0,
    hooks=replace(_hooks(MultitaskPromptEmbedding), task_count=lambda config: config.num_tasks),
    cli_names={"multitask_prompt_tuning": {}},
)

__all__ = [
    "MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "PrefixEncoder",
    "PrefixTuningConfig", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit",
]
