"""Cartridges: a trained key/value cache prefix (the config, the encoder, the initialisation helpers and the
registry entry). Served by the virtual-token methods' :class:`~deltatune.prompt.tuner.PromptTuner` through prefix
tuning's cache machinery (:mod:`deltatune.prompt.prefix`), chosen by ``CartridgeConfig.feeds_kv_cache``."""

from __future__ import annotations

from deltatune.cartridge.config import CartridgeConfig
from deltatune.cartridge.encoder import CartridgeEncoder
from deltatune.cartridge.init import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
from deltatune.config import PeftType
from deltatune.prompt.tuner import PromptTuner
from deltatune.registry import Hooks, Method

CARTRIDGE = Method(
    peft_type=PeftType.CARTRIDGE, config_cls=CartridgeConfig, lr_scale=30.0,  # as prefix tuning
    hooks=Hooks(make_prompt_encoder=CartridgeEncoder, peft_tuner=PromptTuner, peft_table_cls=CartridgeEncoder),
    cli_names={"cartridge": {}},
)

__all__ = ["CARTRIDGE", "CartridgeConfig", "CartridgeEncoder", "compose_cartridge_adapters",
           "initialize_kv_prefix_from_past_key_values", "initialize_kv_prefix_from_text",
           "prompt_embeddings_from_past_key_values"]
