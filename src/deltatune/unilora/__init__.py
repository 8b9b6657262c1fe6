"""Uni-LoRA: the config, the layer, the one trained vector per adapter shared by the whole model, and the registry
entry.

``θ`` lives once per adapter on the model (``base_model.unilora_theta_d.<adapter>``, PEFT's file key
``base_model.unilora_theta_d``); before any layer is wrapped the adapter's index assignment is drawn over all its
targets at once (the scales depend on how often each entry of ``θ`` is used model-wide), and each layer gets its
slice.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out, in_out_features
from deltatune.core.layer import AdapterLayer
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import TargetModuleError
from deltatune.registry import Hooks, Method
from deltatune.unilora.config import UniLoraConfig
from deltatune.unilora.layer import UniLoraLayer, generate_index, inverse_sqrt_counts, supported_types

THETA = "unilora_theta_d"
INDICES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a target as the adapter sees it (``Conv1D``'s weight is ``(in, out)``), looking through an
    adapter layer already on it."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    return in_out_features(base)


def init_shared(adapter_model: nn.Module, adapter_name: str, config: UniLoraConfig,
                target_names: list[str]) -> dict[str, object]:
    """Before any layer is wrapped: ``θ`` for ``adapter_name`` in the model's ``unilora_theta_d`` (created on first
    use; drawn first, as PEFT), then the index assignment over all its targets (model order, ``A`` then ``B``) and
    the ``1/√count`` table. Returns them for :func:`create_or_update`."""
    if not target_names:
        raise TargetModuleError("Uni-LoRA found no linear layer to adapt; check target_modules")
    container = adapter_model._modules.get(THETA)
    if container is None:
        container = nn.ParameterDict()
        setattr(adapter_model, THETA, container)
    if config.init_weights:
        theta = torch.empty(config.theta_d_length).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
    else:
        theta = torch.randn(config.theta_d_length)
    first = adapter_model.model.get_submodule(target_names[0])
    device = (first.get_base_layer() if isinstance(first, AdapterLayer) else first).weight.device
    container[adapter_name] = nn.Parameter(theta.to(device))
    shapes = [_features(adapter_model.model.get_submodule(n)) for n in target_names]
    total = sum(config.r * (fin + fout) for fin, fout in shapes)
    indices = generate_index(total, config.theta_d_length, config.proj_seed)
    assignment, start = {}, 0
    for name, (fin, fout) in zip(target_names, shapes, strict=True):
        idx_a = indices[start:start + config.r * fin].view(config.r, fin)
        start += config.r * fin
        idx_b = indices[start:start + fout * config.r].view(fout, config.r)
        start += fout * config.r
        assignment[name] = (idx_a.clone(), idx_b.clone())
    return {"thetas": container, "assignment": assignment,
            "scale_of": inverse_sqrt_counts(indices, config.theta_d_length)}


def create_or_update(target: nn.Module, adapter_name: str, config: UniLoraConfig, module_name: str,
                     thetas: nn.ParameterDict, assignment: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     scale_of: torch.Tensor) -> UniLoraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a Uni-LoRA layer already)."""
    if isinstance(target, UniLoraLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = UniLoraLayer(target, thetas)
    else:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    indices_a, indices_b = assignment[module_name]
    layer.update_layer(adapter_name, config.r, indices_a, indices_b, scale_of, unilora_dropout=config.unilora_dropout,
                       save_indices=config.save_indices)
    return layer


UNILORA = Method(
    peft_type=PeftType.UNILORA,
    config_cls=UniLoraConfig,
    prefix="unilora_",
    layer_cls=UniLoraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's Uni-LoRA table is a copy of LoRA's
    cli_names={"unilora": {}},
    # lr_scale stays 1, measured (README, issue 22's table): none of 1e-3, 1e-1 and 1.0 makes PEFT's default θ of
    # 256 values learn bbc-news in 12 steps: 0.375 -> 0.375, 0.375 (forgetting -0.0000) and 0.175 (+0.03).
    # All-linear at r = 8 has ~2.4M factor entries, so each θ_i feeds ~9,500 of them with scale 1/√9,500 ≈ 0.01;
    # PEFT's MetaMathQA run uses theta_d_length 131,072 (at 20x its LoRA rate)
    hooks=Hooks(
        shared_containers=(THETA,),
        init_shared=init_shared,
        # The per-layer indices and scales, saved beside θ only with save_indices (PEFT's file keys
        # <module>.unilora_indices_A, ...): listed so files carry them, not among the trainable containers.
        extra_containers=INDICES,
    ),
)
UniLoraModel = tuner_class(UNILORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["UNILORA", "UniLoraConfig", "UniLoraLayer", "UniLoraModel"]
