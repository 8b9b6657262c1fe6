"""LoRA-GA: LoRA initialised from the gradient of the full weight (Wang et al., 2024, "LoRA-GA: Low-Rank
Adaptation with Gradient Approximation"), PEFT 0.21's ``init_lora_weights="lora_ga"``.

The first step of full fine-tuning moves ``W: (out, in)`` along ``-G``, the gradient of the loss w.r.t. ``W``
averaged over a few calibration batches. LoRA-GA picks ``A: (r, in)`` and ``B: (out, r)`` so that the first step
of LoRA changes ``W`` along the best rank-``2r`` approximation of ``G``. With the (randomised, ``q = 4r``)
singular value decomposition ``G ≈ U diag(S) Vᵀ`` and PEFT's default ``direction="ArB2r"``::

    A = V[:, :r]ᵀ                          (the top r right singular vectors)
    B = U[:, r:2r] · diag(S[r:2r])         (the next r left singular vectors, times their singular values)

(``"A2rBr"`` swaps the halves, ``"ArBr"`` interleaves them, ``"random"`` draws ``r`` of the ``2r`` indices for
both). ``scale`` then rescales: ``"stable"`` multiplies ``B`` by ``out^(1/4) / sqrt(stable_gamma)``,
``"weight_svd"`` by ``σ₁(W) / S_B[0]``, ``"gd_scale"`` divides both by the LoRA scaling ``s``, ``"unit"`` keeps them.

``B A`` is not zero, so the base becomes the residual ``W - s B A`` and the model's output at initialisation is
unchanged (as PiSSA/OLoRA, :meth:`LoraLinear._set_residual`). An adapter saved as it is needs that residual base;
saved with ``path_initial_model_for_weight_conversion`` it is a plain LoRA for the original base
(:mod:`deltatune.lora.conversion`).

Using it is PEFT's two steps::

    config = LoraConfig(r=8, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    preprocess_loraga(model, config, train_step)   # train_step(): forward + loss.backward() on a few batches
    model = get_peft_model(model, config)

(or :func:`get_peft_model_with_data` with an iterable of batches). The preprocessing leaves each target layer's
averaged gradient on the layer as ``_peft_loraga_grad`` (PEFT's attribute), so a model preprocessed by PEFT or by
deltatune works with either; creating the adapter consumes it. Only ``nn.Linear``/``Conv1D`` targets are
initialised from gradients; other targets (embeddings, convolutions) get the default init, as in PEFT.

Random numbers are drawn from torch's global generator in PEFT's order (the randomised SVD of each layer's
gradient as the layer is created, after its ``lora_A``/``lora_B`` modules), so the same seed gives PEFT's factors.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError, TargetModuleError

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

GRAD_ATTR = "_peft_loraga_grad"  # PEFT's name: what preprocess_loraga leaves on each target layer
# The LoraGAConfig a layer's init uses, written by check_creatable right before the adapter is built (the layer's
# init is not given the LoraConfig); removed with the gradient when the layer is initialised.
_SETTINGS_ATTR = "_deltatune_loraga_settings"
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """How LoRA-GA turns the gradient's singular vectors into ``A`` and ``B`` (PEFT's ``LoraGAConfig``).

    Args:
        direction: Which of the top ``2r`` singular triplets go where. ``"ArB2r"`` (default, the paper's): ``A``
            the first ``r`` right vectors, ``B`` the next ``r`` left ones; ``"A2rBr"``: the reverse; ``"ArBr"``:
            ``A`` the odd indices, ``B`` the even ones; ``"random"``: the same random ``r`` of ``2r`` for both.
        scale: ``"stable"`` (default): ``B *= out^(1/4) / sqrt(stable_gamma)``; ``"weight_svd"``: ``B`` scaled so
            its top singular value is the base weight's; ``"gd_scale"``: both divided by the LoRA scaling;
            ``"unit"``: no rescaling.
        stable_gamma: ``γ`` of the ``"stable"`` scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"LoraGAConfig.direction={self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if self.scale not in SCALES:
            raise ConfigError(f"LoraGAConfig.scale={self.scale!r} is not one of {', '.join(SCALES)}")
        if self.scale == "stable" and not self.stable_gamma > 0:
            raise ConfigError(f"LoraGAConfig.stable_gamma must be positive, got {self.stable_gamma!r}; 16 is usual")


def _settings(config: object) -> LoraGAConfig:
    """``config.lora_ga_config`` as a :class:`LoraGAConfig` (a saved config holds it as a dict).

    Raises:
        ConfigError: it is not set (PEFT raises ``ValueError`` there too).
    """
    value = getattr(config, "lora_ga_config", None)
    if value is None:
        raise ConfigError("init_lora_weights='lora_ga' needs LoraConfig(lora_ga_config=LoraGAConfig(...)) "
                          "(LoraGAConfig() for the paper's defaults)")
    if isinstance(value, LoraGAConfig):
        return value
    fields = asdict(value) if is_dataclass(value) else dict(value)
    known = {k: fields[k] for k in ("direction", "scale", "stable_gamma") if k in fields}
    return LoraGAConfig(**known)


# ---- finding the layers ----------------------------------------------------------------------
def _gradient_types() -> tuple[type, ...]:
    """The layer types LoRA-GA initialises from gradients (PEFT's: ``nn.Linear`` and ``transformers``' ``Conv1D``)."""
    from deltatune.lora.layer import _conv1d_type

    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _resolved(model: nn.Module, config: object) -> object:
    """``config`` with ``target_modules`` filled in (architecture default, ``all-linear`` expanded), as get_peft_model
    will fill it."""
    from deltatune.core.targeting import DEFAULT_LORA_TARGETS, resolve_target_modules

    resolve_target_modules(model, config, DEFAULT_LORA_TARGETS)
    return config


def _target_layers(model: nn.Module, config: object) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear``/``Conv1D`` layers ``config`` targets, in ``named_modules`` order."""
    from deltatune.core.targeting import check_target_module_exists

    kinds = _gradient_types()
    return [(name, module) for name, module in model.named_modules()
            if name and isinstance(module, kinds) and check_target_module_exists(config, name)]


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "quant_state") or type(module).__module__.startswith("bitsandbytes") or \
        not module.weight.dtype.is_floating_point


# ---- step 1: the gradients -------------------------------------------------------------------
@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: object, train_step: Callable[[], None],
                      cache_file: str | os.PathLike | None = None) -> None:
    """Run ``train_step`` and leave each LoRA-GA target layer's gradient on it, for ``get_peft_model`` (PEFT's
    ``preprocess_loraga``).

    For every ``nn.Linear``/``Conv1D`` that ``lora_config`` targets, ``module._peft_loraga_grad: (out, in)`` (the
    weight's shape) becomes ``∂L/∂W`` summed over everything ``train_step`` backpropagates, divided by the number of
    the layer's forward calls that were backpropagated (one per batch: the mean gradient of the batches). Only
    those weights require grad meanwhile; the model's ``requires_grad`` flags, existing ``.grad`` and train/eval
    mode are restored afterwards.

    Args:
        model: The base model (before ``get_peft_model``).
        lora_config: The ``LoraConfig`` the adapter will be created with (``init_lora_weights="lora_ga"``,
            ``lora_ga_config`` set). A ``target_modules`` of ``None`` or ``"all-linear"`` is filled in, as PEFT does.
        train_step: Called once with gradients enabled; it runs the forward and ``loss.backward()`` on the
            calibration batches (no optimiser step).
        cache_file: If given and non-empty, the gradients are read from it instead (PEFT's format:
            ``{"<module name>._peft_loraga_grad": tensor}``); otherwise they are computed and written there.

    Raises:
        ConfigError: ``lora_ga_config`` is not set; a target is quantised (LoRA-GA needs full-precision
            gradients); the cache file lacks a target or holds another shape.
        TargetModuleError: no ``nn.Linear``/``Conv1D`` layer is targeted.
    """
    _settings(lora_config)
    _resolved(model, lora_config)
    targets = _target_layers(model, lora_config)
    quantized = [name for name, module in targets if _is_quantized(module)]
    if quantized:
        raise ConfigError(f"LoRA-GA needs full-precision gradients, but {quantized[0]} is quantised; preprocess and "
                          "create the adapter on the unquantised model")
    if cache_file is not None and os.path.isfile(cache_file) and os.path.getsize(cache_file) > 0:
        _load_cache(targets, os.fspath(cache_file), _device(model))
        return
    estimate_gradients(model, lora_config, train_step)
    if cache_file is not None:
        _save_cache(targets, os.fspath(cache_file))


def estimate_gradients(model: nn.Module, lora_config: object, train_step: Callable[[], None]) -> None:
    """The gradient step of :func:`preprocess_loraga` (PEFT's name): ``_peft_loraga_grad`` on each target layer.

    The count a layer's summed gradient is divided by is the number of its forward outputs that received a
    gradient (PEFT counts its backward-hook calls: the same number).
    """
    targets = _target_layers(model, lora_config)
    if not targets:
        raise TargetModuleError("LoRA-GA initialises nn.Linear and Conv1D layers, and lora_config.target_modules "
                                "matches none of this model's; pass their names (e.g. ['q_proj', 'v_proj'])")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    stashed = {name: module.weight.grad for name, module in targets}
    counts = dict.fromkeys(stashed, 0)
    was_training = model.training

    def counter(name: str) -> Callable:
        def count(_grad: torch.Tensor) -> None:
            counts[name] += 1

        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(count)
        return hook

    hooks = []
    try:
        for p in params:  # only the target weights get gradients: no memory for the others'
            p.requires_grad_(False)
        for name, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)
            hooks.append(module.register_forward_hook(counter(name)))
        model.train()  # PEFT estimates in training mode (dropout on, as in fine-tuning)
        with torch.enable_grad():
            train_step()
        for name, module in targets:
            grad = module.weight.grad
            if counts[name] and grad is not None:
                setattr(module, GRAD_ATTR, grad.detach() / counts[name])
    finally:
        for handle in hooks:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for name, module in targets:
            module.weight.grad = stashed[name]
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _load_cache(targets: list[tuple[str, nn.Module]], path: str, device: torch.device) -> None:
    cache = torch.load(path, map_location=device, weights_only=True)
    for name, module in targets:
        grad = cache.get(f"{name}.{GRAD_ATTR}")
        if grad is None or grad.shape != module.weight.shape:
            found = "missing" if grad is None else f"of shape {tuple(grad.shape)}"
            raise ConfigError(f"the LoRA-GA gradient cache {path} does not fit this model and config: {name}'s "
                              f"gradient is {found} (weight {tuple(module.weight.shape)}); delete the file to "
                              "compute the gradients again")
    for name, module in targets:
        setattr(module, GRAD_ATTR, cache[f"{name}.{GRAD_ATTR}"])


def _save_cache(targets: list[tuple[str, nn.Module]], path: str) -> None:
    from deltatune.core.io import atomic_write

    cache = {f"{name}.{GRAD_ATTR}": getattr(module, GRAD_ATTR) for name, module in targets
             if hasattr(module, GRAD_ATTR)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(cache, tmp))


# ---- step 2: creating the adapter --------------------------------------------------------------
def check_creatable(model: nn.Module, config: object) -> None:
    """Refuse, before the model changes, a LoRA-GA adapter whose gradients are not there or do not fit; then note
    on each target layer which :class:`LoraGAConfig` its init uses.

    PEFT silently gives a layer without a gradient the default init (B = 0) instead, which is rarely what was
    meant (``preprocess_loraga`` forgotten, or run with other ``target_modules``); deltatune says so.

    Raises:
        ConfigError: ``lora_ga_config`` unset; no target has a gradient (``preprocess_loraga`` did not run) or some
            lack one; a gradient of another shape than its weight; ``2r`` above ``min(out, in)`` (LoRA-GA takes
            ``2r`` singular vectors of the gradient).
    """
    settings = _settings(config)
    resolved = _resolved(model, copy.copy(config))
    targets = _target_layers(model, resolved)
    if not targets:
        return  # only other layer types (default init) or nothing: get_peft_model reports that itself
    quantized = [name for name, module in targets if _is_quantized(module)]
    if quantized:
        raise ConfigError(f"LoRA-GA needs full-precision weights and gradients, but {quantized[0]} is quantised; "
                          "create the adapter on the unquantised model")
    missing = [name for name, module in targets if not hasattr(module, GRAD_ATTR)]
    if len(missing) == len(targets):
        raise ConfigError(
            "init_lora_weights='lora_ga' is computed from the gradients of calibration batches, and this model has "
            "none: call deltatune.preprocess_loraga(model, config, train_step) before get_peft_model (train_step "
            "runs forward and loss.backward() on a few batches), or create the adapter with "
            "deltatune.lora.init.get_peft_model_with_data(model, config, batches). Loading adapters created with "
            "LoRA-GA works without them: PeftModel.from_pretrained / load_adapter / --adapter")
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ConfigError(f"LoRA-GA has no gradient for {len(missing)} targeted layer(s): {shown}. Run "
                          "preprocess_loraga with this same config (its target_modules), make sure train_step "
                          "backpropagates through those layers, or exclude them (exclude_modules)")
    for name, module in targets:
        grad = getattr(module, GRAD_ATTR)
        if tuple(grad.shape) != tuple(module.weight.shape):
            raise ConfigError(f"{name}'s LoRA-GA gradient has shape {tuple(grad.shape)}, its weight "
                              f"{tuple(module.weight.shape)}: the gradients come from another model; run "
                              "preprocess_loraga on this one")
        r = resolved.rank_for(name) if hasattr(resolved, "rank_for") else resolved.r
        if 2 * r > min(grad.shape):
            raise ConfigError(f"LoRA-GA takes 2r = {2 * r} singular vectors of {name}'s gradient, which has only "
                              f"{min(grad.shape)}; use r <= {min(grad.shape) // 2} for it (r or rank_pattern)")
    for _, module in targets:
        setattr(module, _SETTINGS_ATTR, settings)


def init_layer(layer: nn.Module, adapter_name: str) -> None:
    """Initialise ``layer``'s new adapter: from the gradient ``preprocess_loraga`` left on a Linear/Conv1D base
    (:func:`lora_ga_factors`, then the residual base ``W - s B A``), the default init on any other layer type."""
    from deltatune.lora.layer import LoraLinear

    base = layer.get_base_layer()
    if not isinstance(layer, LoraLinear) or not isinstance(base, _gradient_types()):
        layer._init_weights(adapter_name, True)  # PEFT: embeddings and convolutions get the default init
        return
    grad = getattr(base, GRAD_ATTR, None)
    if grad is None:
        raise ConfigError("this layer has no LoRA-GA gradient: call deltatune.preprocess_loraga(model, config, "
                          "train_step) before creating the adapter")
    settings = getattr(base, _SETTINGS_ATTR, None) or LoraGAConfig()
    g = grad.float()
    g = g.T if layer.fan_in_fan_out else g  # (out, in) whatever the storage layout
    weight = layer._base_weight().detach()
    # PEFT's "stable" scale reads the stored weight's first dimension: ``out``, but ``in`` for a Conv1D's (in, out)
    a, b = lora_ga_factors(g, layer.r[adapter_name], layer.scaling[adapter_name], settings, weight,
                           stable_fan=base.weight.shape[0])
    # PEFT rounds A and B to the base's dtype before it computes the residual, so the residual matches the
    # adapter that is stored (bit-for-bit in bf16 too).
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    layer._set_residual(adapter_name, a=a, b=b)
    delattr(base, GRAD_ATTR)  # PEFT frees it too: one gradient per target, the size of its weight
    if hasattr(base, _SETTINGS_ATTR):
        delattr(base, _SETTINGS_ATTR)


@torch.no_grad()
def lora_ga_factors(grad: torch.Tensor, r: int, scaling: float, settings: LoraGAConfig,
                    weight: torch.Tensor | None = None, stable_fan: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, in)`` and ``B: (out, r)`` (fp32) from a gradient ``grad: (out, in)``.

    ``grad ≈ U diag(S) Vᵀ`` by ``torch.svd_lowrank`` (``q = min(4r, out, in)``, 4 subspace iterations; it draws
    its random projection from torch's global generator, as PEFT's). Of the top ``2r`` triplets, ``direction``
    picks index sets ``I_A`` and ``I_B`` of ``r`` each; ``A = V[:, I_A]ᵀ``, ``B = U[:, I_B] diag(S[I_B])``; then
    ``scale`` (see :class:`LoraGAConfig`) rescales. ``weight: (out, in)`` is needed for ``scale="weight_svd"``;
    ``stable_fan`` is the ``out`` of the ``"stable"`` factor ``out^(1/4) / sqrt(γ)`` (default ``grad``'s rows).
    """
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, *grad.shape), niter=4)
    u, s, v = u[:, :2 * r], s[:2 * r], v[:, :2 * r]
    if settings.direction == "ArB2r":
        rows_a, cols_b = slice(0, r), slice(r, 2 * r)
    elif settings.direction == "A2rBr":
        rows_a, cols_b = slice(r, 2 * r), slice(0, r)
    elif settings.direction == "ArBr":  # A the odd indices, B the even ones
        rows_a, cols_b = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    else:  # "random": the same r of the 2r indices for A and B
        rows_a = cols_b = torch.randperm(2 * r)[:r]
    a = v[:, rows_a].T
    s_b = s[cols_b]
    b = u[:, cols_b] * s_b[None, :]
    if settings.scale == "stable":
        b = b * ((stable_fan or grad.shape[0]) ** 0.25 / settings.stable_gamma ** 0.5)
    elif settings.scale == "weight_svd":
        if weight is None:
            raise ConfigError("LoraGAConfig(scale='weight_svd') needs the base weight")
        _, weight_s, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif settings.scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a.contiguous(), b.contiguous()


def get_peft_model_with_data(model: nn.Module, config: object, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default", *, create: Callable[..., PeftModel]) -> PeftModel:
    """``preprocess_loraga`` with a ``train_step`` that runs forward and ``loss.backward()`` on each of ``batches``
    (dicts of tensors with ``labels``, moved to the model's device), then ``create`` (``get_peft_model``). An unset
    ``lora_ga_config`` becomes ``LoraGAConfig()`` (the paper's defaults), saved with the adapter.

    Raises:
        ConfigError: a batch without ``labels`` (no loss to take the gradient of), or no batches at all.
    """
    if getattr(config, "lora_ga_config", None) is None:
        config.lora_ga_config = LoraGAConfig()
    device = _device(model)

    def train_step() -> None:
        seen = 0
        for batch in batches:
            if "labels" not in batch:
                raise ConfigError(f"LoRA-GA takes the gradient of the loss, so each batch needs 'labels'; got the "
                                  f"keys {sorted(batch)}")
            out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            loss = out["loss"] if isinstance(out, Mapping) else out.loss
            loss.backward()
            seen += 1
        if not seen:
            raise ConfigError("LoRA-GA needs at least one calibration batch; the data gave none")

    preprocess_loraga(model, config, train_step)
    return create(model, config, adapter_name=adapter_name)
