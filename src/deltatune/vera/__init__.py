"""VeRA: the config, the layer, the shared projections, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out
from deltatune.core.projections import SharedNames, check_shared_settings, first_sharer, share
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.registry import Hooks, Method
from deltatune.vera.config import VeraConfig
from deltatune.vera.layer import (
    ProjectionDict,
    VeraLayer,
    base_features,
    make_projections,
    supported_types,
)

_NAMES = SharedNames(peft_seed="Vera", peft_save="VeRA", method="VeRA", tensors="projections")


def _check_compatible(adapter_model: nn.Module, adapter_name: str, config: VeraConfig,
                      shapes: list[tuple[int, int]]) -> None:
    """PEFT's rules for a further VeRA adapter on one model: its projections are the first adapter's (one shared
    pair per model), so the seed and ``save_projection`` must match (:func:`check_shared_settings`), each target's
    ``(out, in)`` in ``shapes`` must fit the pair (``A: (r0, in_max)``, ``B: (out_max, r0)``) and ``r`` may not
    exceed its rank ``r0`` (checked in that order, as PEFT does). Refusing here keeps every adapter loadable by
    PEFT with the same numbers."""
    found = first_sharer(adapter_model, adapter_name, config)
    if found is None:
        return
    check_shared_settings(adapter_model, adapter_name, config, _NAMES)
    first, first_config = found
    container = adapter_model._modules.get("vera_A")
    if container is not None and first in container:
        in_max, out_max = container[first].shape[1], adapter_model.vera_B[first].shape[0]
        for name, size, need in (("vera_A", in_max, max(s[1] for s in shapes)),
                                 ("vera_B", out_max, max(s[0] for s in shapes))):
            if need > size:
                raise ConfigError(
                    f"{name} has a size of {size} but {need} or greater is required; this probably happened because "
                    "an additional VeRA adapter was added after the first one with incompatible shapes. VeRA adapter "
                    f"{adapter_name!r} targets a layer with {need} {'out' if name == 'vera_B' else 'in'} features but "
                    f"the projections shared with adapter {first!r} cover {size}: add the adapter with the largest "
                    "layers first"
                )
    rank = container[first].shape[0] if container is not None and first in container else first_config.r
    if config.r > rank:
        raise ConfigError(
            f"vera_A has a size of {rank} but {config.r} or greater is required; this probably happened because an "
            "additional VeRA adapter with a lower rank was added after the first one; loading the adapters in reverse "
            f"order may solve this. VeRA adapter {adapter_name!r} has r={config.r}, larger than the shared "
            f"projections' rank {rank} (from "
            f"adapter {first!r}); use r<={rank}, or add the adapter with the largest r first"
        )


def init_shared(adapter_model: nn.Module, adapter_name: str, config: VeraConfig,
                target_names: list[str]) -> dict[str, ProjectionDict]:
    """Draw ``adapter_name``'s projections ``A: (r, in_max)``, ``B: (out_max, r)`` over all its targets and
    store them in the model's ``vera_A``/``vera_B`` (created on first use); returns them for the layers."""
    shapes = [base_features(adapter_model.model.get_submodule(n)) for n in target_names]
    if not shapes:
        raise TargetModuleError("VeRA found no linear layer to adapt; check target_modules")
    _check_compatible(adapter_model, adapter_name, config, shapes)
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    # A further adapter shares the first one's projections, the very tensors (as PEFT: same seed, so the same
    # numbers, and one copy in memory); its own r uses their first r rows / columns.
    return share(adapter_model, adapter_name, config, ("vera_A", "vera_B"),
                 lambda: make_projections(config.r, in_max, out_max, config.projection_prng_key))


def create_or_update(target: nn.Module, adapter_name: str, config: VeraConfig, module_name: str,
                     vera_A: ProjectionDict, vera_B: ProjectionDict) -> VeraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a VeRA layer already)."""
    if isinstance(target, VeraLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = VeraLayer(target, vera_A, vera_B)
    else:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(adapter_name, r=config.r, vera_dropout=config.vera_dropout, init_weights=config.init_weights,
                       d_initial=config.d_initial)
    return layer


VERA = Method(
    peft_type=PeftType.VERA,
    config_cls=VeraConfig,
    prefix="vera_lambda_",
    layer_cls=VeraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's VeRA table is LoRA's (phi: q_proj, v_proj, as ours)
    cli_names={"vera": {}},
    lr_scale=30.0,  # only per-layer scaling vectors train (measured, see README)
    hooks=Hooks(
        cli_shared_skip=("r",),  # the recipes' r=8 is a LoRA rank; VeRA's r sizes the shared projections (256)
        shared_containers=("vera_A", "vera_B"),
        init_shared=init_shared,
    ),
)
VeraModel = tuner_class(VERA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["VERA", "VeraModel", "ProjectionDict", "VeraConfig", "VeraLayer"]
