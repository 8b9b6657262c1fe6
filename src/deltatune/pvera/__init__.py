"""PVeRA: the config, the layer, the shared projections, and the registry entry.

The projections are shared, seeded and saved (or not) by the machinery VeRA's use
(:mod:`deltatune.core.projections`), drawn as VeRA's with twice the rows in ``A``; what is PVeRA's own is the
layer's sampling.
"""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out, in_out_features
from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict, SharedNames, check_shared_settings, first_sharer, share
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.pvera.config import PveraConfig
from deltatune.pvera.layer import PveraLayer, make_projections, supported_types
from deltatune.registry import Hooks, Method

_NAMES = SharedNames(peft_seed="PVeRA", peft_save="PVeRA", method="PVeRA", tensors="projections",
                     values_as_set=True)


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a target, looking through an adapter layer already on it."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    in_features, out_features = in_out_features(base)
    return out_features, in_features


def _check_compatible(adapter_model: nn.Module, adapter_name: str, config: PveraConfig,
                      shapes: list[tuple[int, int]]) -> None:
    """PEFT's rules for a further PVeRA adapter, which shares the first one's ``A: (2 r0, in_max)``,
    ``B: (out_max, r0)``: the same seed and ``save_projection``, every target within ``in_max``/``out_max``, and
    the same ``r`` (checked in PEFT's order, its sentence first). PEFT accepts ``r < r0`` and ``r0 < r <= 2 r0``
    only to fail in the forward (``λ_d: (2r,)`` against ``A``'s ``2 r0`` rows), so deltatune refuses them here.
    All before anything is built."""
    found = first_sharer(adapter_model, adapter_name, config)
    if found is None:
        return
    check_shared_settings(adapter_model, adapter_name, config, _NAMES)
    first = found[0]
    container = adapter_model._modules.get("pvera_A")
    if container is None or first not in container:
        return
    a, b = container[first], adapter_model.pvera_B[first]
    for name, size, need in (("pvera_A", a.shape[1], max(s[1] for s in shapes)),
                             ("pvera_B", b.shape[0], max(s[0] for s in shapes))):
        if need > size:
            raise ConfigError(
                f"{name} has a size of {size} but {need} or greater is required; this probably happened because an "
                "additional PVeRA adapter was added after the first one with incompatible shapes. PVeRA adapter "
                f"{adapter_name!r} targets a layer with {need} {'out' if name == 'pvera_B' else 'in'} features but the "
                f"projections shared with adapter {first!r} cover {size}: add the adapter with the largest layers first"
            )
    rank = b.shape[1]
    for name, size in (("pvera_A", a.shape[0]), ("pvera_B", rank)):
        if config.r > size:
            raise ConfigError(
                f"{name} has a size of {size} but {config.r} or greater is required; this probably happened because "
                "an additional PVeRA adapter with a lower rank was added after the first one; loading the adapters in "
                f"reverse order may solve this. PVeRA adapter {adapter_name!r} has r={config.r} but the projections it "
                f"shares with adapter {first!r} have r={rank}: use r={rank}"
            )
    if config.r < rank:
        raise ConfigError(
            f"PVeRA adapter {adapter_name!r} has r={config.r} but the projections it shares with adapter {first!r} "
            f"have r={rank}; every PVeRA adapter of a model needs the first one's r: use r={rank}"
        )


def init_shared(adapter_model: nn.Module, adapter_name: str, config: PveraConfig,
                target_names: list[str]) -> dict[str, ProjectionDict]:
    """Draw ``adapter_name``'s projections ``A: (2r, in_max)``, ``B: (out_max, r)`` over all its targets (or share
    the first adapter's) into the model's ``pvera_A``/``pvera_B``; returns them for the layers."""
    shapes = [_shape(adapter_model.model.get_submodule(n)) for n in target_names]
    if not shapes:
        raise TargetModuleError("No layers types compatible with PVeRA were found. Please check "
                                "`peft_config.target_modules`. (PVeRA adapts linear layers and GPT-2's Conv1D.)")
    _check_compatible(adapter_model, adapter_name, config, shapes)
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    return share(adapter_model, adapter_name, config, ("pvera_A", "pvera_B"),
                 lambda: make_projections(config.r, in_max, out_max, config.projection_prng_key))


def create_or_update(target: nn.Module, adapter_name: str, config: PveraConfig, module_name: str,
                     pvera_A: ProjectionDict, pvera_B: ProjectionDict) -> PveraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a PVeRA layer already)."""
    if isinstance(target, PveraLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = PveraLayer(target, pvera_A, pvera_B)
    else:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(adapter_name, r=config.r, pvera_dropout=config.pvera_dropout, init_weights=config.init_weights,
                       d_initial=config.d_initial, sample_at_inference=config.sample_at_inference,
                       generator_seed=config.generator_seed)
    return layer


PVERA = Method(
    peft_type=PeftType.PVERA,
    config_cls=PveraConfig,
    prefix="pvera_lambda_",
    layer_cls=PveraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets={**DEFAULT_LORA_TARGETS, "dinov2": ["query", "value"]},  # PEFT's: VeRA's table plus DINOv2
    cli_names={"pvera": {}},
    # only per-layer scaling vectors train, as VeRA's; PEFT's MetaMathQA run also trains PVeRA at 30x its LoRA rate.
    # Measured (README, issue 22's table): 12 bbc-news steps learn nothing at 3e-2 (0.375 -> 0.275) nor at 1e-1
    # (0.375, +0.38 nats forgetting). A likely reason, not a learning rate's: training reads z = μ + σ ⊙ ε, with
    # σ = exp(λ_d ⊙ A x / 2) ≈ 1 at init against μ = λ_d ⊙ A x (λ_d = 0.1), so the noise outweighs the mean
    lr_scale=30.0,
    hooks=Hooks(
        cli_shared_skip=("r",),  # the recipes' r=8 is a LoRA rank; PVeRA's r sizes the shared projections (256)
        shared_containers=("pvera_A", "pvera_B"),
        init_shared=init_shared,
    ),
)
PveraModel = tuner_class(PVERA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["PVERA", "PveraConfig", "PveraLayer", "PveraModel"]
