"""WaveFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.registry import Hooks, Method
from deltatune.waveft.config import WaveFTConfig
from deltatune.waveft.layer import WaveFTLayer, make_waveft_layer, supported_types

WaveFTLinear = WaveFTLayer  # PEFT's name of the Linear layer (isinstance checks written for PEFT)

# PEFT's table for WaveFT
WAVEFT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["mlp.c_proj"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["mlp.c_proj"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: coefficients per layer and the transform (WaveFT has no rank)."""
    transform = (f"inverse {config.get('wavelet_family', 'db1')} wavelet transform" if config.get("use_idwt", True)
                 else "no transform (a sparse ΔW)")
    text = f"n_frequency={config.get('n_frequency')} coefficients per layer, {transform}, " \
           f"scaling {config.get('scaling')}"
    counts = sorted({shape[0] for key, shape in shapes.items() if key.endswith(".waveft_spectrum") and shape})
    if counts:
        text += f"; in the file: {', '.join(map(str, counts))} per layer"
    return text


def proportional_n_frequency(adapter_model: nn.Module, adapter_name: str, config: WaveFTConfig,
                             target_names: list[str]) -> dict[str, Any]:
    """``proportional_parameters``: each target's share of ``n_frequency · len(targets)``, in proportion to its
    ``in · out``, rounded, at least 1 (PEFT's); passed to every ``create_or_update`` of this injection."""
    if not config.proportional_parameters:
        return {}
    sizes = {}
    for name in target_names:
        module = adapter_model.model.get_submodule(name)
        layer = module if isinstance(module, WaveFTLayer) else make_waveft_layer(module)
        if layer is not None:
            sizes[name] = layer.in_features * layer.out_features
    total, budget = sum(sizes.values()), config.n_frequency * len(sizes)
    return {"n_frequency_by_module": {name: max(1, round(size / total * budget)) for name, size in sizes.items()}}


def create_or_update(target: nn.Module, adapter_name: str, config: WaveFTConfig, module_name: str,
                     n_frequency_by_module: dict[str, int] | None = None) -> WaveFTLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a WaveFT layer already).

    ``n_frequency``: the proportional share if ``proportional_parameters``, else ``n_frequency_pattern``'s entry,
    else the config's. ``fan_in_fan_out`` follows the layer's type (with PEFT's warning where the config says
    otherwise)."""
    layer = target if isinstance(target, WaveFTLayer) else make_waveft_layer(target)
    if layer is None:
        return None
    if target is not layer:
        if layer.fan_in_fan_out and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=4)
        elif not layer.fan_in_fan_out and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", stacklevel=4)
    n_frequency = (n_frequency_by_module or {}).get(module_name) or config.n_frequency_for(module_name)
    layer.update_layer(adapter_name, n_frequency=n_frequency, scaling=config.scaling,
                       wavelet_family=config.wavelet_family, use_idwt=config.use_idwt,
                       random_loc_seed=config.random_loc_seed, init_weights=config.init_weights)
    return layer


WAVEFT = Method(
    peft_type=PeftType.WAVEFT,
    config_cls=WaveFTConfig,
    prefix="waveft_",
    layer_cls=WaveFTLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=WAVEFT_TARGETS,
    cli_names={"waveft": {}},
    hooks=Hooks(init_shared=proportional_n_frequency, inspect_size=inspect_size),
)
WaveFTModel = tuner_class(WAVEFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["WAVEFT", "WaveFTConfig", "WaveFTLayer", "WaveFTLinear", "WaveFTModel"]
