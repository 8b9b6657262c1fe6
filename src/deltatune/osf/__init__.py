"""OSF: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import ALL_LINEAR
from deltatune.core.tuner import tuner_class
from deltatune.osf.config import OSFConfig
from deltatune.osf.layer import OSFLayer, make_osf_layer, supported_types
from deltatune.registry import Hooks, Method

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
# PEFT's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING: every projection of a block, not LoRA's q/v
DEFAULT_OSF_TARGETS: dict[str, list[str]] = {
    **{t: _PROJECTIONS for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2",
                                 "qwen3", "phi")},
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


def prepare_config(model: nn.Module, config: OSFConfig) -> None:
    """As PEFT: with no ``target_modules`` and no default for the architecture, every linear layer (the output
    layer excepted)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None and model_type not in DEFAULT_OSF_TARGETS:
        config.target_modules = ALL_LINEAR


def create_or_update(target: nn.Module, adapter_name: str, config: OSFConfig, module_name: str) -> OSFLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an OSF layer already), its
    ``effective_rank`` resolved against the weight's smaller dimension."""
    layer = target if isinstance(target, OSFLayer) else make_osf_layer(target)
    if layer is None:
        return None
    k = config.effective_rank_for(module_name, min(layer.in_features, layer.out_features))
    layer.update_layer(adapter_name, k, init_weights=config.init_weights)
    return layer


OSF = Method(
    peft_type=PeftType.OSF,
    config_cls=OSFConfig,
    prefix="osf_",
    layer_cls=OSFLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_OSF_TARGETS,
    cli_names={"osf": {}},
    # measured (README, issue 22's table): the default trains the lower half of every weight's spectrum (37% of
    # SmolLM2), close to full fine-tuning, which wants far smaller steps than an adapter: 12 bbc-news steps at 1e-3
    # give 0.375 -> 0.175 accuracy and +13.6 nats forgetting, at 3e-4 0.75 and +6.1, at 1e-4 0.85 and +0.31 (PEFT's
    # MetaMathQA run trains OSF at half its LoRA rate); the same losses as PEFT's (tests/osf/test_train_parity.py)
    lr_scale=0.1,
    hooks=Hooks(prepare_config=prepare_config),
)
OSFModel = tuner_class(OSF)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["OSF", "OSFConfig", "OSFLayer", "OSFModel"]
