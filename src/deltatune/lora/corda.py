"""CorDA: context-oriented decomposition adaptation (Yang et al., 2024, https://arxiv.org/abs/2406.05223).

CorDA takes the adapter out of the base weight, like PiSSA, but decomposes the weight *as the data sees it*.
For a target layer ``W: (out, in)`` and the covariance of its inputs over a calibration set
``C = mean over samples of X^T X: (in, in)`` (each sample ``X: (tokens, in)`` divided by its largest value):

* ``W C = U S Vh`` (SVD; ``C`` damped to ``C + d·mean(diag C)·I`` until it inverts well), so
  ``W = U S (Vh C^-1) = U S V^T`` with ``V = (Vh C^-1)^T: (in, min(in, out))``;
* IPM (instruction-previewed mode) keeps the ``r`` largest triplets: the directions the task's data uses most
  train; KPM (knowledge-preserving mode) keeps the ``r`` smallest: the directions the data (e.g. QA on world
  knowledge) uses most stay frozen in the base;
* ``A = sqrt(S_r / s) V_r^T: (r, in)``, ``B = U_r sqrt(S_r / s): (out, r)`` with ``s`` the LoRA scaling, and the
  base becomes the residual ``W - s B A``, so the model's output is unchanged at initialisation.

PEFT's two-step API, with its names: :func:`preprocess_corda` runs the model on the calibration data and stores
``module.eigens`` (``S_WC: (r,)``, ``U_WC: (out, r)``, ``V_WC: (in, r)``) on every target ``Linear``/``Conv1D``;
``get_peft_model`` with ``init_lora_weights="corda"`` then builds ``A, B`` from them (:func:`init_layer`) and
writes the residual. :func:`get_peft_model_with_data` does both from an iterable of batches.

An adapter saved as it is expects the residual base; saved with ``path_initial_model_for_weight_conversion`` it
becomes a plain LoRA of rank ``2r`` for the original base (:mod:`deltatune.lora.conversion`), as in PEFT.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.lora.config import LoraConfig
    from deltatune.lora.layer import LoraLayer
    from deltatune.peft_model import PeftModel

CORDA_METHODS = ("ipm", "kpm")
# The damping starts at 1% of the mean input variance and doubles until C_damped @ C_damped^-1 is within this
# Frobenius distance of I (PEFT's rule: a low-rank covariance from too few samples would not invert).
_FIRST_DAMP, _INVERSE_TOLERANCE = 0.01, 0.05


@dataclass
class CordaConfig:
    """How :func:`preprocess_corda` builds CorDA's decomposition (PEFT's ``CordaConfig``: names and defaults).

    Args:
        cache_file: Where to save the cropped decomposition (``{name}.eigens.S_WC/U_WC/V_WC``, PEFT's format);
            when the file exists, it is read instead of running the model (same model and ranks needed).
        covariance_file: Where to save the input covariances (``{name}: (in, in)``); when it exists, it is read
            instead of running the model, e.g. to build adapters of other ranks from the same data.
        corda_method: ``"ipm"`` (the ``r`` largest singular triplets of ``W C``) or ``"kpm"`` (the ``r`` smallest).
        verbose: Show progress over the layers.
        use_float16_for_covariance: Accumulate the covariances in the activations' dtype instead of fp32 (half
            the memory over a half-precision model; less precise).
        prune_temporary_fields: Delete ``covariance_matrix``, ``sample_count``, ``corda_method`` and ``rank``
            from the modules once the decomposition is built (``eigens`` stays until the adapter is created).
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


@dataclass
class CordaEigens:
    """The part of ``W C = U S Vh`` a CorDA adapter starts from, stored on a target module as ``eigens``:
    ``S_WC: (r,)``, ``U_WC: (out, r)``, ``V_WC = (Vh C^-1)^T: (in, r)`` (PEFT's names)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def as_corda_config(value: object, init_lora_weights: object = "corda") -> CordaConfig | None:
    """``LoraConfig.corda_config`` as a :class:`CordaConfig`: a dict (as ``adapter_config.json`` holds it; keys
    PEFT does not accept are dropped, as PEFT does), the dataclass, or ``None`` (the default config when the init
    is ``"corda"``, with PEFT's warning)."""
    from deltatune.lora.init import as_init_config

    return as_init_config(value, init_lora_weights, "corda", CordaConfig, "CorDA")


# ---- which modules ------------------------------------------------------------------------------
def _conv1d() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return ()
    return (Conv1D,)


def _resolved(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` with ``target_modules`` filled in as ``get_peft_model`` will (architecture default,
    ``all-linear``); the caller's config is left alone."""
    from deltatune.core.targeting import DEFAULT_LORA_TARGETS, resolve_target_modules

    resolved = copy.copy(config)
    resolve_target_modules(model, resolved, DEFAULT_LORA_TARGETS)
    return resolved


def _targets(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module ``config`` targets (a LoRA layer's base layer stands for it)."""
    from deltatune.core.targeting import _is_adapter_internal, check_target_module_exists
    from deltatune.lora.layer import LoraLayer

    resolved = _resolved(model, config)
    for name, module in model.named_modules():
        if name and not _is_adapter_internal(name) and check_target_module_exists(resolved, name):
            yield name, module.base_layer if isinstance(module, LoraLayer) else module


def _linear_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The targets CorDA decomposes: ``nn.Linear`` and ``transformers``' ``Conv1D`` (PEFT's choice)."""
    kinds = (nn.Linear, *_conv1d())
    return [(name, module) for name, module in _targets(model, config) if isinstance(module, kinds)]


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """``W: (out, in)`` in fp32 (``Conv1D`` stores ``(in, out)``)."""
    w = module.weight.detach().float()
    return w.T if isinstance(module, _conv1d()) else w


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _save(obj: dict[str, torch.Tensor], path: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def _readable(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


# ---- preprocessing ------------------------------------------------------------------------------
@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Store CorDA's decomposition as ``module.eigens`` on every ``Linear``/``Conv1D`` that ``lora_config``
    targets in ``model``, for ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"``.

    ``run_model()`` runs the model on the calibration data (PEFT's advice: about ``in / tokens_per_sample · 128``
    distinct samples, e.g. 256 samples of 2048 tokens for hidden size 4096; too few give a low-rank covariance).
    Each forward call's input to a layer, ``x: (tokens, in)`` (or ``(batch, tokens, in)``: each row counts as one
    sample), adds ``(x / |max x|)^T (x / |max x|)`` to that layer's sum; ``C`` is the mean over samples.
    With ``cache_file`` (or ``covariance_file``) of ``lora_config.corda_config`` present, the model is not run.

    Args:
        model: The model the adapter will be created on (it is put in eval mode, as PEFT does).
        lora_config: Its ``corda_config`` (a :class:`CordaConfig` or dict; default when ``None``), ``r``,
            ``rank_pattern`` and target selection are used.
        run_model: Runs the calibration forward passes; ``None`` only when a cache or covariance file exists.
        hooked_model: Collect the covariances on this model instead (same module names), e.g. an inference copy.

    Raises:
        ConfigError: no ``run_model`` and no file to read, an unknown ``corda_method``, a target layer the
            calibration never ran, or a ``cache_file`` without some target layer.
        ValueError: NaN/Inf in a layer's input or covariance.
    """
    corda = as_corda_config(lora_config.corda_config) or CordaConfig()
    targets = _linear_targets(model, lora_config)
    device = _device(model)
    if _readable(corda.cache_file):
        cache = torch.load(corda.cache_file, map_location=device, weights_only=True)
        missing = [name for name, _ in targets if f"{name}.eigens.S_WC" not in cache]
        if missing:
            raise ConfigError(f"cache_file {corda.cache_file} has no decomposition for {missing[:3]}: it was built "
                              "for another model or target_modules; delete it or point cache_file elsewhere")
        for name, module in targets:
            module.eigens = CordaEigens(S_WC=cache[f"{name}.eigens.S_WC"], U_WC=cache[f"{name}.eigens.U_WC"],
                                        V_WC=cache[f"{name}.eigens.V_WC"])
        return
    if corda.corda_method not in CORDA_METHODS:
        raise ConfigError(f"corda_config.corda_method={corda.corda_method!r}: use 'ipm' (adapter from the largest "
                          "singular directions of W C) or 'kpm' (from the smallest, preserving knowledge)")
    covariances = _covariances(model, lora_config, corda, targets, run_model, hooked_model)
    layers = list(targets)
    if corda.verbose:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Collecting eigens")
    for name, module in layers:
        rank = lora_config.rank_for(name)
        s, u, v = _decompose(_dense_weight(module), covariances[name][0].float())
        # IPM: the r largest singular triplets; KPM: the r smallest. Cloned so that a saved cache holds only them.
        keep = slice(None, rank) if corda.corda_method == "ipm" else slice(-rank, None)
        module.eigens = CordaEigens(S_WC=s[keep].clone(), U_WC=u[:, keep].clone().to(device),
                                    V_WC=v[:, keep].clone().to(device))
        if not corda.prune_temporary_fields:  # PEFT leaves these on the modules unless told to prune them
            module.covariance_matrix, module.sample_count = covariances[name]
            module.corda_method, module.rank = corda.corda_method, rank
    if corda.cache_file is not None:
        _save({f"{name}.eigens.{part}": getattr(module.eigens, part)
               for name, module in targets for part in ("S_WC", "U_WC", "V_WC")}, corda.cache_file)


def _covariances(model: nn.Module, lora_config: LoraConfig, corda: CordaConfig,
                 targets: list[tuple[str, nn.Module]], run_model: Callable[[], None] | None,
                 hooked_model: nn.Module | None) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (C: (in, in), samples)}`` for every target: read from ``covariance_file`` (samples unknown: 0)
    or collected with forward hooks while ``run_model()`` runs, then saved there when it is set."""
    if _readable(corda.covariance_file):
        stored = torch.load(corda.covariance_file, map_location=_device(model), weights_only=True)
        return {name: (stored[name], 0) for name, _ in targets}
    if run_model is None:
        raise ConfigError("preprocess_corda needs run_model (a callable that runs the model on calibration data) "
                          "when corda_config has no existing cache_file or covariance_file")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    sums: dict[str, list] = {}  # name -> [sum of X^T X, samples]

    def collect(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]  # (samples, tokens, in)
            for sample in x:
                if not corda.use_float16_for_covariance:
                    sample = sample.float()
                sample = sample / sample.max().abs()
                if not torch.isfinite(sample).all():
                    raise ValueError(f"NaN/Inf in the input of {name} while collecting CorDA covariances (an "
                                     "all-zero sample divides by 0); check the calibration data")
                covariance = sample.T @ sample  # (in, in)
                if not torch.isfinite(covariance).all():
                    raise ValueError(f"NaN/Inf in the input covariance of {name}; set "
                                     "use_float16_for_covariance=False if it overflowed in half precision")
                entry = sums.setdefault(name, [0, 0])
                entry[0] = entry[0] + covariance
                entry[1] += 1
        return hook

    handles = [module.register_forward_hook(collect(name)) for name, module in _linear_targets(hooked, lora_config)]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in targets if name not in sums]
    if missing:
        raise ConfigError(f"CorDA needs the inputs of every target layer, but run_model() never ran {missing[:3]}"
                          f"{' ...' if len(missing) > 3 else ''}; run the model (or hooked_model) on the "
                          "calibration data there, or narrow target_modules")
    result = {name: (sums[name][0] / sums[name][1], sums[name][1]) for name, _ in targets}
    if corda.covariance_file is not None:
        _save({name: c for name, (c, _) in result.items()}, corda.covariance_file)
    return result


def _decompose(w: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W: (out, in)``, ``C: (in, in)`` -> ``S: (k,)``, ``U: (out, k)``, ``V: (in, k)`` with ``k = min(out, in)``
    and ``W = U diag(S) V^T`` exactly in exact arithmetic: ``W C_d = U S Vh`` and ``V = (Vh C_d^-1)^T``, where
    ``C_d = C + damp · mean(diag C) · I`` with the smallest ``damp`` in 0.01, 0.02, 0.04, ... that inverts to
    within tolerance. ``U`` and ``V`` are returned on the CPU (the full ones are large; they are cropped next)."""
    eye = torch.eye(c.shape[0], device=c.device)
    mean_variance = torch.mean(torch.diag(c))
    damp = _FIRST_DAMP
    while True:
        damped = c + torch.diag(torch.ones(c.shape[0], device=c.device) * mean_variance * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < _INVERSE_TOLERANCE:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w.to(c.device) @ damped, full_matrices=False)
    v = (vh @ inverse).T
    return s, u.cpu(), v.cpu()


# ---- creating the adapter ------------------------------------------------------------------------
def _eigens_problem(name: str, module: nn.Module, rank: int) -> str | None:
    """Why ``module`` cannot start a rank-``rank`` CorDA adapter, or ``None``."""
    eigens = getattr(module, "eigens", None)
    if eigens is None:
        return f"{name} has none"
    out_dim, in_dim = _dense_weight(module).shape if module.weight.dtype.is_floating_point else (None, None)
    want = {"U_WC": (out_dim, rank), "S_WC": (rank,), "V_WC": (in_dim, rank)}
    for part, shape in want.items():
        got = tuple(getattr(eigens, part).shape)
        if got != shape:
            return (f"{name}.eigens.{part} is {got}, not {shape}: it was built for another rank or model (a "
                    "cache_file built with other ranks?)")
    return None


def check_creatable(model: nn.Module, config: LoraConfig) -> None:
    """Refuse, before the model changes, a CorDA adapter whose targets lack :func:`preprocess_corda`'s
    ``eigens`` (PEFT raises ``ValueError`` from the first such layer, its base half rewritten; ``ConfigError`` is a
    ``ValueError``), whose eigens were built for other ranks, whose base is not fp32/fp16/bf16 (re-quantise the
    residual model afterwards instead), or that targets layers CorDA cannot initialise (Conv)."""
    kinds = (nn.Linear, *_conv1d())
    for name, module in _targets(model, config):
        if isinstance(module, nn.Embedding):
            continue  # PEFT gives Embedding targets the default init (A = 0, B normal) under "corda" too
        if not isinstance(module, kinds):
            raise ConfigError(f"init_lora_weights='corda' initialises Linear/Conv1D layers, not {name} "
                              f"({type(module).__name__}); exclude it from target_modules")
        if module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"init_lora_weights='corda' needs a float32/float16/bfloat16 base weight, {name} is "
                              f"{module.weight.dtype}; create the adapter on the unquantised model, then quantise "
                              "the residual base")
        problem = _eigens_problem(name, module, config.rank_for(name))
        if problem is not None:
            raise ConfigError(
                f"init_lora_weights='corda' is computed from the input covariances of a calibration set, which "
                f"preprocess_corda(model, config, run_model) stores as each target layer's eigens; {problem}. Run "
                "deltatune.lora.corda.preprocess_corda on this model with this config first, or create the adapter "
                "with deltatune.lora.init.get_peft_model_with_data(model, config, batches). Loading adapters "
                "created with CorDA works without it: PeftModel.from_pretrained / load_adapter / --adapter")


@torch.no_grad()
def init_layer(layer: LoraLayer, adapter_name: str) -> None:
    """``init_lora_weights="corda"`` on one LoRA layer: ``A = sqrt(S / s) V^T: (r, in)``,
    ``B = U sqrt(S / s): (out, r)`` from its base layer's ``eigens``, and the base becomes ``W - s B A``
    (``LoraLinear._set_residual``); the eigens are then dropped (PEFT's order). Embedding layers get the default
    init, as in PEFT."""
    from deltatune.lora.layer import LoraLinear

    if not isinstance(layer, LoraLinear):
        return layer._init_weights(adapter_name, True)
    base = layer.base_layer
    rank = layer.r[adapter_name]
    problem = _eigens_problem(f"the base of this {type(layer).__name__}", base, rank)
    if problem is not None:  # check_creatable refuses this before any layer changes
        raise ConfigError(f"init_lora_weights='corda': {problem}; run preprocess_corda with this config first")
    eigens = base.eigens
    device = base.weight.device
    for part in ("S_WC", "U_WC", "V_WC"):
        if not torch.isfinite(getattr(eigens, part)).all():
            raise ValueError(f"NaN/Inf in the CorDA decomposition ({part}); check the calibration data")
    root = torch.sqrt(eigens.S_WC.float().to(device) / layer.scaling[adapter_name])  # (r,)
    a = eigens.V_WC.float().to(device).T * root[:, None]
    b = eigens.U_WC.float().to(device) * root[None, :]
    layer._set_residual(adapter_name, a=a, b=b)
    del base.eigens


def _one_sample_per_call(batch: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Each row of ``batch`` alone, without its padding (``attention_mask == 0``), as PEFT's recipe feeds
    ``preprocess_corda``: a sample's covariance is scaled by its own largest value, so padding would change it."""
    ids = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    if ids is None:
        return
    mask = batch.get("attention_mask")
    for i in range(ids.shape[0]):
        keep = mask[i].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        row: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == ids.shape[0]:
                value = value[i:i + 1]
                if keep is not None and value.dim() >= 2 and value.shape[1] == keep.shape[0]:
                    value = value[:, keep]
            row[key] = value
        yield row


def get_peft_model_with_data(model: nn.Module, config: LoraConfig, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default", *, create: Callable[..., PeftModel]) -> PeftModel:
    """:func:`preprocess_corda` with ``run_model`` running ``model`` on ``batches`` (one sample per call, padding
    dropped; tensors moved to the model's device), then ``create(model, config)`` (``get_peft_model``)."""
    device = _device(model)

    def run_model() -> None:
        for batch in batches:
            for row in _one_sample_per_call(batch):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in row.items()})

    preprocess_corda(model, config, run_model=run_model)
    return create(model, config, adapter_name=adapter_name)
