"""Adaption prompts (LLaMA-Adapter): the config, the layer, and the registry entry.

The method wraps the top ``adapter_layers`` attention modules of a decoder (PEFT's rule: the modules whose name ends
in ``"." + target_modules``, the last ones in model order) in :class:`AdaptedAttention`; everything else (several
named adapters, switching, disabling, mixed-adapter batches, files) is the weight adapters' shared machinery.
Nothing can be merged (``mergeable=False``).
"""

from __future__ import annotations

from torch import nn

from deltatune.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG, AdaptionPromptConfig, ModelTypeConfig
from deltatune.adaption_prompt.layer import AdaptedAttention
from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.registry import Hooks, Method


def model_type_config(model: nn.Module) -> ModelTypeConfig:
    """The table entry of ``model``'s architecture.

    Raises:
        ConfigError: a model type the method does not know (PEFT's sentence first, then the known ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise ConfigError(f"Unsupported model type for adaption prompt: '{model_type}'. deltatune supports "
                          f"{sorted(TRANSFORMERS_MODEL_CONFIG)}; use LoRA or prefix tuning for other models")
    return TRANSFORMERS_MODEL_CONFIG[model_type]


def prepare_config(model: nn.Module, config: AdaptionPromptConfig) -> None:
    """PEFT's ``prepare_config``: the architecture's attention module name when ``target_modules`` is ``None``;
    refuse a model type the method does not know and a config without ``adapter_len``/``adapter_layers``."""
    entry = model_type_config(model)
    config.check_complete()
    if config.target_modules is None:
        config.target_modules = entry.target_modules


def find_targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    """The top ``adapter_layers`` modules whose name ends in ``"." + target_modules``, in model order (PEFT assumes
    the blocks are registered bottom to top, as every transformers decoder does).

    Raises:
        TargetModuleError: fewer such modules than ``adapter_layers`` (PEFT's sentence first).
    """
    from deltatune.core.targeting import adapter_internal_names

    internal = adapter_internal_names(model)
    names = [n for n, _ in model.named_modules() if n.endswith(f".{config.target_modules}") and n not in internal]
    if len(names) < config.adapter_layers:
        raise TargetModuleError(
            f"Config specifies more adapter layers '{config.adapter_layers}' than the model has '{len(names)}'. "
            f"(modules named *.{config.target_modules}; lower adapter_layers or fix target_modules)")
    return names[-config.adapter_layers:]


def create_or_update(target: nn.Module, adapter_name: str, config: AdaptionPromptConfig, module_name: str
                     ) -> AdaptedAttention:
    """Add adapter ``adapter_name`` to the attention module ``target`` (wrapping it first unless it is wrapped)."""
    if isinstance(target, AdaptedAttention):
        layer = target
    else:
        layout = _layout_of(target)
        layer = AdaptedAttention(target, layout)
    layer.update_layer(adapter_name, config.adapter_len)
    return layer


def _layout_of(module: nn.Module) -> str:
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        return "qkvo"
    if hasattr(module, "c_attn") and hasattr(module, "head_dim"):
        return "gpt2"
    raise TargetModuleError(f"{type(module).__name__} is not an attention module adaption prompts can wrap (it needs "
                            "q_proj/k_proj/v_proj/o_proj, or GPT-2's c_attn); set target_modules to the attention "
                            "module's name")


ADAPTION_PROMPT = Method(
    peft_type=PeftType.ADAPTION_PROMPT,
    config_cls=AdaptionPromptConfig,
    prefix="adaption_",
    layer_cls=AdaptedAttention,
    create_or_update=create_or_update,
    supported_types=lambda: (nn.Module,),
    cli_names={"adaption_prompt": {}},
    mergeable=False,
    lr_scale=10.0,  # a few prompt vectors and one gate per layer: PEFT's LLaMA-Adapter example trains at 9e-3
    hooks=Hooks(
        prepare_config=prepare_config,
        find_targets=find_targets,
        cli_shared_skip=("target_modules",),  # the recipes' "all-linear" names linear layers, not attention modules
    ),
)
AdaptionPromptModel = tuner_class(ADAPTION_PROMPT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["ADAPTION_PROMPT", "AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptModel"]
