"""Bottleneck adapters (Houlsby / Pfeiffer, sequential or parallel): the config, the layer, the registry entry."""

from __future__ import annotations

import re
import warnings

from torch import nn

from deltatune.bottleneck.config import DEFAULT_BOTTLENECK_TARGETS, BottleneckConfig
from deltatune.bottleneck.layer import BottleneckLayer
from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.errors import TargetModuleError
from deltatune.registry import Hooks, Method

# Where an architecture without a table entry keeps the two sub-layers, by the names transformers' decoders use
# (GPT-NeoX, Phi-3, OPT, Falcon, ...): tried in order, and used only when one module per block matches.
_BLOCK = r"(?:.*\.)?(?:layers|layer|h|blocks)\.\d+"
_BY_NAME = {
    "attn": (r".*\.(?:self_attn|attn|attention|self_attention)\.(?:o_proj|out_proj|c_proj|dense|wo)",),
    "ffn": (r".*\.(?:mlp|feed_forward|ffn)", _BLOCK + r"\.fc2"),
}


def placement_by_name(names: list[str]) -> dict[str, str]:
    """``{location: regex}`` for the locations whose module these module ``names`` name as most decoders do, one
    per block."""
    blocks = sum(1 for n in names if re.fullmatch(_BLOCK, n))
    found = {}
    for location, patterns in _BY_NAME.items():
        for pattern in patterns:
            if blocks and sum(1 for n in names if re.fullmatch(pattern, n)) == blocks:
                found[location] = pattern
                break
    return found


def prepare_config(model: nn.Module, config: BottleneckConfig) -> None:
    """``target_modules=None``: the architecture's attention output / feed-forward block per ``locations`` (from the
    table, else found by the usual module names)."""
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [n for n, _ in model.named_modules()]
    table = DEFAULT_BOTTLENECK_TARGETS.get(model_type) or placement_by_name(names)
    missing = [loc for loc in config.locations if loc not in table]
    if missing:
        first = next((n for n in names if re.fullmatch(_BLOCK, n)), None)
        inside = sorted(n.removeprefix(first + ".") for n in names if first and n.startswith(first + "."))
        raise TargetModuleError(
            f"no default bottleneck placement for model_type={model_type!r} at {missing}; pass target_modules=[...] "
            f"(the attention output projection and/or the feed-forward block"
            + (f"; the modules of one block are: {', '.join(inside)}" if inside else "") + ")")
    if model_type not in DEFAULT_BOTTLENECK_TARGETS:
        first = [next(n for n in names if re.fullmatch(table[loc], n)) for loc in config.locations]
        warnings.warn(f"bottleneck adapters on model_type={model_type!r}, placed by module name: after "
                      f"{' and '.join(first)} and the same modules of every other block; pass target_modules to "
                      "choose others", stacklevel=3)
    config.target_modules = "|".join(f"(?:{table[loc]})" for loc in config.locations)


def init_shared(adapter_model: nn.Module, adapter_name: str, config: BottleneckConfig, targets) -> dict:
    """Pass the model's hidden size to every layer (the width of a block such as Llama's ``mlp``)."""
    model_config = getattr(adapter_model.model, "config", None)
    size = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    return {"hidden_size": size}


def create_or_update(target: nn.Module, adapter_name: str, config: BottleneckConfig, module_name: str,
                     hidden_size: int | None = None) -> BottleneckLayer:
    """Add adapter ``adapter_name`` around ``target`` (wrapping it first unless it is a bottleneck layer)."""
    layer = target if isinstance(target, BottleneckLayer) else BottleneckLayer(target, hidden_size)
    layer.update_layer(adapter_name, config.reduction_factor, config.non_linearity, config.parallel,
                       config.scaling, config.init_weights)
    return layer


BOTTLENECK = Method(
    peft_type=PeftType.BOTTLENECK,
    config_cls=BottleneckConfig,
    prefix="bottleneck_",
    layer_cls=BottleneckLayer,
    create_or_update=create_or_update,
    supported_types=lambda: (nn.Module,),
    cli_names={"bottleneck": {}, "houlsby": {"locations": ["attn", "ffn"]},
               "parallel_adapter": {"parallel": True, "scaling": 4.0}},
    mergeable=False,
    hooks=Hooks(
        prepare_config=prepare_config,
        init_shared=init_shared,
        cli_shared_skip=("target_modules",),  # the recipes' "all-linear" would override --locations
    ),
)
BottleneckModel = tuner_class(BOTTLENECK)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["BOTTLENECK", "BottleneckModel", "BottleneckConfig", "BottleneckLayer"]
