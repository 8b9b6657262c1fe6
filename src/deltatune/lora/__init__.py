"""LoRA, rsLoRA and DoRA: the config, the layers, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.lora import hooks
from deltatune.lora.config import LoraConfig
from deltatune.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from deltatune.lora.init import check_creatable
from deltatune.lora.layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, make_lora_layer, supported_types
from deltatune.lora.mha import LoraMultiheadAttention
from deltatune.lora.param import LoraParam
from deltatune.lora.param import after_inject as _inject_parameters
from deltatune.lora.param import prepare_config as _prepare_parameters
from deltatune.lora.tying import prepare_tied_targets, tie_lora_targets, tie_modules_to_save
from deltatune.lora.variants import variant_flags, variants_of
from deltatune.registry import Hooks, Method
from deltatune.trainable_tokens import add_token_adapters


def create_or_update(target: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a LoRA layer already)."""
    if isinstance(target, nn.MultiheadAttention):  # packed q/k/v + out_proj (PEFT's lora.MultiheadAttention)
        target = LoraMultiheadAttention(target)
    layer = target if isinstance(target, LoraLayer) else make_lora_layer(target, config.fan_in_fan_out)
    if layer is None:
        return None
    if isinstance(layer, LoraLinear):  # GPT-2's Conv1D stores W as (in, out); embeddings and convs have no flag
        follow_fan_in_fan_out(layer, config, module_name)
    for variant in variants_of(config):  # a variant may refuse the module by name before the layer changes
        variant.check_target(layer, module_name)
    layer.update_layer(
        adapter_name,
        r=config.rank_for(module_name),
        lora_alpha=config.alpha_for(module_name),
        lora_dropout=config.lora_dropout,
        init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora,
        **variant_flags(config),  # use_dora, use_alora and any other variant's flag (deltatune.lora.variants)
        lora_bias=config.lora_bias,
    )
    return layer


def _prepare_config(model: nn.Module, config: LoraConfig) -> None:
    _prepare_parameters(model, config)  # target_parameters alone: no default target_modules
    check_creatable(model, config)
    prepare_tied_targets(model, config)  # ensure_weight_tying: LoRA on the embedding, lm_head tied to it


def _after_inject(adapter_model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    _inject_parameters(adapter_model, adapter_name, config)  # target_parameters (MoE experts): LoraParam
    tie_lora_targets(adapter_model, adapter_name, config)  # ensure_weight_tying: lm_head shares the embed's A/B
    tie_modules_to_save(adapter_model, adapter_name, config)  # ensure_weight_tying: lm_head follows the embed copy
    add_token_adapters(adapter_model, adapter_name, config)


LORA = Method(
    peft_type=PeftType.LORA,
    config_cls=LoraConfig,
    prefix="lora_",
    layer_cls=LoraLayer,
    create_or_update=create_or_update,
    supported_types=lambda: (*supported_types(), nn.MultiheadAttention),
    default_targets=DEFAULT_LORA_TARGETS,
    file_suffixes={"lora_magnitude_vector.weight": "lora_magnitude_vector"},
    cli_names={"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}},
    hooks=Hooks(
        prepare_config=_prepare_config,  # data-driven inits refused at creation (loading resets them first)
        after_inject=_after_inject,  # target_parameters; trainable_token_indices: embedding rows train beside LoRA
        extra_containers=("trainable_tokens_delta",),
        # what PeftModel asks of LoRA (lora/hooks.py): aLoRA, arithmetic, PiSSA & co. conversion and reloading
        activate=hooks.activate,
        add_weighted_adapter=hooks.add_weighted_adapter,
        convert_on_save=hooks.convert_on_save,
        loading=hooks.loading,
        after_load=hooks.after_load,
        create_with_data=hooks.create_with_data,
        data_init=hooks.data_init,
        saves_initial=hooks.saves_initial,
        rewrites_base_on_load=hooks.rewrites_base_on_load,
        serve_refusal=hooks.serve_refusal,  # aLoRA, target_parameters: no mixed-adapter batches yet
        rank_container="lora_A",
        nested_containers=("token_adapter.trainable_tokens_delta",),  # trainable_token_indices
    ),
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
LoraModel = tuner_class(LORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["LoraConfig", "LoraModel", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraMultiheadAttention",
           "LoraParam", "LORA", "EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights"]
