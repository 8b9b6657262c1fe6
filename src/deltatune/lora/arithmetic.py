"""Adapter arithmetic: a new LoRA adapter that is a weighted combination of existing ones.

``PeftModel.add_weighted_adapter(adapters, weights, name, combination_type, ...)`` (Hugging Face PEFT's
signature and semantics). The new adapter has ``lora_alpha = r`` (scaling 1), so its factors carry each
source's scaling ``s_i``. Per layer, with sources ``(A_i: (r_i, in), B_i: (out, r_i), s_i)``:

- ``cat``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]``: ``B A = Σ w_i s_i B_i A_i`` exactly;
  rank ``Σ r_i``.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the factors are combined
  separately, ``A = merge(A_i, ±sqrt|w_i s_i|)``, ``B = merge(B_i, sqrt|w_i s_i|)`` (the sign goes on ``A``
  only), with ``merge`` from :mod:`deltatune.core.merge_utils`. An approximation of ``Σ w_i s_i B_i A_i`` (cross
  terms ``B_i A_j``); every source must have the same rank.
- ``svd`` and the ``*_svd`` forms: ``ΔW = merge(ΔW_i, w_i)`` densely (``ΔW_i = s_i B_i A_i``), then the top
  ``svd_rank`` singular triplets ``ΔW ≈ U S Vh``: ``B = U S``, ``A = Vh`` (optionally clamped to the
  ``svd_clamp`` quantile of their entries). Default rank: the largest source rank.

Embedding layers (``lora_embedding_A/B``) and convolutions (``ΔW`` flattened to ``(out, in·k)``) are covered,
as are adapters that adapt different layers (a layer sums only the sources present on it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from deltatune.config import PeftType
from deltatune.core import merge_utils
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.lora.config import LoraConfig
from deltatune.lora.layer import LoraConv, LoraEmbedding, LoraLayer
from deltatune.lora.variants import variants_of

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def check_and_plan(configs: dict[str, LoraConfig], adapters: Sequence[str], weights: Sequence[float],
                   combination_type: str, svd_rank: int | None, svd_clamp: float | None, density: float | None,
                   majority_sign_method: str) -> tuple[str, int, set[str] | str]:
    """Validate the request; return ``(combination_type, new_rank, new_target_modules)``.

    PEFT's rules: one adapter is always combined ``linear``; ``linear``-type combinations need equal ranks
    (``rank_pattern`` counts with its largest value); ``cat`` sums the ranks; ``*svd`` uses ``svd_rank`` or the
    largest rank. Targets are the union of the sources' (sets are joined, regexes or-ed).

    Raises:
        AdapterNameError: an unknown adapter.
        ConfigError: anything else that cannot be combined, with the fix.
    """
    if not adapters:
        raise ConfigError("add_weighted_adapter needs at least one adapter name in `adapters`")
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter")
    for name in adapters:
        if name not in configs:
            raise AdapterNameError(f"no adapter named {name!r}; this model has {sorted(configs)}")
        config = configs[name]
        if config.peft_type != PeftType.LORA:
            raise ConfigError(f"adapter {name!r} is {config.peft_type}; add_weighted_adapter combines LoRA adapters")
        for variant in variants_of(config):
            if variant.weighted_merge_refusal is not None:
                raise ConfigError(f"adapter {name!r} uses {variant.label}: {variant.weighted_merge_refusal}; "
                                  "merge_and_unload() it, or combine plain LoRA adapters")
        if config.lora_bias:
            raise ConfigError(f"adapter {name!r} has lora_bias=True: combined adapters carry no bias; combine "
                              "adapters trained without lora_bias")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type={combination_type!r} is unknown; use one of "
                          f"{', '.join(COMBINATION_TYPES)}")
    if len(adapters) == 1:
        combination_type = "linear"  # one adapter: every combination reduces to scaling it
    base_how = combination_type.removesuffix("_svd")
    if base_how in _PRUNING:
        merge_utils.check_density(density, base_how)
    if base_how in ("ties", "dare_ties") and majority_sign_method not in merge_utils.SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}: use 'total' or 'frequency'")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank={svd_rank!r} must be a positive integer (or None: the largest source rank)")
    if svd_clamp is not None and not 0.0 <= float(svd_clamp) <= 1.0:
        raise ConfigError(f"svd_clamp={svd_clamp!r} is a quantile and must be in [0, 1]")

    ranks = [_max_rank(configs[n]) for n in adapters]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            shown = ", ".join(f"{n}: r={r}" for n, r in zip(adapters, ranks))
            raise ConfigError(f"combination_type={combination_type!r} combines the LoRA factors directly, so every "
                              f"adapter needs the same rank ({shown}); use 'cat' or 'svd' for different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    targets = [configs[n].target_modules for n in adapters]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ConfigError("the adapters' target_modules mix a regex string with a list of names; combine adapters "
                          "whose target_modules have the same form")
    if isinstance(targets[0], str):
        new_targets: set[str] | str = "|".join(f"({t})" for t in targets)
    else:
        new_targets = set().union(*targets)
    return combination_type, new_rank, new_targets


def _check_modules_to_save(peft_model: PeftModel, adapters: Sequence[str]) -> None:
    clashes = [name for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)
               and sum(a in m.modules_to_save for a in adapters) > 1]
    if clashes:
        raise ConfigError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                          f"found {len(clashes)} such instance(s). Adapters {list(adapters)} each train their own "
                          f"copy of {clashes[:3]}, which cannot be combined; combine adapters without shared "
                          "modules_to_save")


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` of adapter ``name`` on ``layer`` (Embedding: ``lora_embedding_A/B``), or ``None``."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _write(target: torch.Tensor, value: torch.Tensor, rank_dim: int) -> None:
    """Copy ``value`` into the new adapter's factor, zero-padding the rank axis up to the new rank."""
    target.zero_()
    target.narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)


def _combine_cat(layer: LoraLayer, sources: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    a_parts, b_parts = [], []
    for name, weight in sources:
        a, b = _factors(layer, name)
        a_parts.append(a.data * weight * layer.scaling[name])
        b_parts.append(b.data)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _combine_factors(layer: LoraLayer, sources: list[tuple[str, float]], how: str, density: float | None,
                     majority_sign_method: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    a_list, b_list, w_a, w_b = [], [], [], []
    for name, weight in sources:
        a, b = _factors(layer, name)
        ws = weight * layer.scaling[name]
        root = math.sqrt(abs(ws))
        w_a.append(root if ws >= 0 else -root)  # the sign on A only, or it would cancel in B A
        w_b.append(root)
        a_list.append(a.data)
        b_list.append(b.data)
    if len({t.shape for t in a_list}) > 1:
        shown = ", ".join(f"{n}: {tuple(t.shape)}" for (n, _), t in zip(sources, a_list))
        raise ConfigError(f"{where}: combination {how!r} needs equal ranks on every layer, but lora_A shapes differ "
                          f"({shown}); use combination_type='cat' or 'svd'")
    dtype = a_list[0].dtype
    device = a_list[0].device
    a = merge_utils.combine(a_list, torch.tensor(w_a, device=device), how, density, majority_sign_method)
    b = merge_utils.combine(b_list, torch.tensor(w_b, device=device), how, density, majority_sign_method)
    return a.to(dtype), b.to(dtype)


def _dense_update(layer: LoraLayer, name: str) -> torch.Tensor:
    """``ΔW = s · B A`` in the base weight's storage layout. For a convolution with a kernel larger than 1x1 it is
    computed as PEFT does, as a convolution of ``A`` with ``B`` (``ΔW[o, i, k] = Σ_r B[o, r] A[r, i, k]``): a
    matmul gives the same numbers up to rounding, and the SVD types must see PEFT's exact input to match it bit
    for bit."""
    if not isinstance(layer, LoraConv) or layer.base_layer.groups > 1:
        return layer.get_delta_weight(name)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.dim() == 4 and a.shape[2:] == (1, 1):
        return layer.get_delta_weight(name)
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * layer.scaling[name]


def _combine_svd(layer: LoraLayer, sources: list[tuple[str, float]], how: str, new_rank: int,
                 density: float | None, majority_sign_method: str, clamp: float | None, full_matrices: bool,
                 driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the top-``new_rank`` SVD of the merged dense update, oriented ``(out, in)``."""
    deltas = [_dense_update(layer, name) for name, _ in sources]  # scaling included; the storage layout
    weights = torch.tensor([w for _, w in sources], device=deltas[0].device)
    base_how = how.removesuffix("_svd")
    delta = merge_utils.combine(deltas, weights, "linear" if base_how == "svd" else base_how, density,
                                majority_sign_method)
    if isinstance(layer, LoraConv):
        delta = delta.flatten(start_dim=1)                       # (out, in · k)
    if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, LoraEmbedding):
        delta = delta.T                                          # stored (in, out) / (num, dim) -> (out, in)
    dtype = delta.dtype
    if dtype in (torch.float16, torch.bfloat16):
        delta = delta.float()                                    # LAPACK has no half-precision SVD
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, s.numel())                                 # a rank above min(out, in) is zero-padded
    u = u[:, :k] @ torch.diag(s[:k])                             # (out, k)
    vh = vh[:k, :]                                               # (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.to(dtype), u.to(dtype)


def _svd_from_factors(layer: LoraLayer, sources: list[tuple[str, float]], new_rank: int,
                      clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``svd`` without forming ``ΔW``: ``ΔW = B_cat A_cat`` with ``B_cat = [B_1 ... B_n]: (out, R)`` and
    ``A_cat = [w_1 s_1 A_1; ...]: (R, in)``, ``R = Σ r_i``. With ``B_cat = Q_b R_b`` and ``A_cat^T = Q_a R_a``
    (QR), ``ΔW = Q_b (R_b R_a^T) Q_a^T``, so the SVD of the ``R x R`` core gives ``ΔW``'s: ``U = Q_b U_c``,
    ``Vh = Vh_c Q_a^T``. Cost ``O((out + in) R^2)`` instead of ``O(out · in · min(out, in))``; the same
    truncated update up to rounding (a singular vector's sign may differ from the dense SVD's).
    """
    a_cat, b_cat = _combine_cat(layer, sources)
    a_cat, b_cat = a_cat.flatten(1), b_cat.flatten(1)              # conv: (R, in·k), (out, R)
    dtype = a_cat.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q_b, r_b = torch.linalg.qr(b_cat.to(compute))
    q_a, r_a = torch.linalg.qr(a_cat.to(compute).T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T)
    k = min(new_rank, s.numel())
    u = (q_b @ u_c[:, :k]) * s[:k]                                 # (out, k)
    vh = vh_c[:k] @ q_a.T                                          # (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.to(dtype), u.to(dtype)


def _combined_config(configs: dict[str, LoraConfig], first: str, new_rank: int,
                     targets: set[str] | str) -> LoraConfig:
    """The first source's config with ``r = lora_alpha = new_rank`` (scaling 1) and the joined targets.

    Unlike PEFT, rsLoRA is switched off (PEFT keeps it, which scales the result by ``sqrt(r)``) and any init other
    than the plain ones becomes ``True``: the new adapter's factors are overwritten anyway, and re-running PiSSA,
    OLoRA, CorDA, LoRA-GA or LoftQ would rewrite the base weights (or, for the data-driven ones, need their data).
    """
    source = configs[first]
    init = source.init_lora_weights
    if init not in (True, False, "gaussian"):
        init = True
    return dataclasses.replace(
        source, r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={}, rank_pattern={},
        use_rslora=False, init_lora_weights=init,
    )


def add_weighted_adapter(peft_model: PeftModel, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total", svd_from_factors: bool = False) -> None:
    """Add LoRA adapter ``adapter_name`` = the ``combination_type`` combination of ``adapters`` with ``weights``.

    The new adapter is not made active (call ``set_adapter``). Weights may be negative (subtracting an adapter).
    The DARE types draw from torch's global RNG in PEFT's order, so ``torch.manual_seed(k)`` before the call
    gives the same adapter as PEFT under the same seed.

    ``svd_from_factors`` (deltatune only; ``combination_type="svd"``): compute the SVD from the stacked LoRA
    factors (QR, then an ``R x R`` SVD, ``R = Σ r_i``) instead of the dense ``ΔW``: the same update up to
    rounding, orders of magnitude faster on large layers; ``svd_full_matrices``/``svd_driver`` do not apply.

    Raises:
        AdapterNameError: ``adapter_name`` exists already (PEFT silently returns), or a source does not exist.
        ConfigError: mismatched ranks, target forms, modules_to_save, DoRA/``lora_bias`` sources, a missing
            ``density``... The model is unchanged on any error.
    """
    configs = peft_model.peft_config
    if adapter_name in configs:
        raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name or "
                               "delete_adapter() it first")
    how, new_rank, targets = check_and_plan(configs, adapters, weights, combination_type, svd_rank, svd_clamp,
                                            density, majority_sign_method)
    _check_modules_to_save(peft_model, adapters)
    if svd_from_factors and combination_type != "svd":
        raise ConfigError(f"svd_from_factors applies to combination_type='svd' only, not {combination_type!r} "
                          "(pruned updates are not low-rank); drop svd_from_factors")
    weights = [float(w) for w in weights]
    peft_model.add_adapter(adapter_name, _combined_config(configs, adapters[0], new_rank, targets))
    try:
        with torch.no_grad():
            for where, layer in peft_model.base_model.adapter_layers():
                if not isinstance(layer, LoraLayer):
                    continue
                present = [(n, w) for n, w in zip(adapters, weights) if _factors(layer, n) is not None]
                new = _factors(layer, adapter_name)
                if new is None:
                    if present:
                        raise ConfigError(
                            f"{where} carries adapter {present[0][0]!r} but the combined adapter (with "
                            f"{adapters[0]!r}'s layers_to_transform / exclude_modules) does not reach it; "
                            "combine adapters whose configs select the same layers")
                    continue
                new_a, new_b = new
                if not present:  # a target of the joined config that no source adapted: ΔW = 0
                    new_a.zero_()
                    new_b.zero_()
                    continue
                if how == "cat":
                    a, b = _combine_cat(layer, present)
                elif svd_from_factors and how == "svd":
                    a, b = _svd_from_factors(layer, present, new_rank, svd_clamp)
                    a = a.reshape(a.shape[0], *new_a.shape[1:])
                    b = b.reshape(b.shape[0], b.shape[1], *new_b.shape[2:])
                elif how in FACTOR_TYPES:
                    a, b = _combine_factors(layer, present, how, density, majority_sign_method, where)
                else:
                    a, b = _combine_svd(layer, present, how, new_rank, density, majority_sign_method, svd_clamp,
                                        svd_full_matrices, svd_driver)
                    a = a.reshape(a.shape[0], *new_a.shape[1:])  # conv: back to (k, in, *kernel)
                    b = b.reshape(b.shape[0], b.shape[1], *new_b.shape[2:])
                _write(new_a, a, rank_dim=0)
                _write(new_b, b, rank_dim=1)
    except BaseException:
        peft_model._remove_adapter(adapter_name)
        raise
