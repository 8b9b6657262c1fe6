"""ASA, AdaMSS's adaptive subspace allocation: which subspaces keep training (PEFT's
``AdamssModel.update_and_allocate``, step for step).

Called once per optimizer step after ``optimizer.step()`` and before ``zero_grad()`` with ``global_step`` ``t``.
For an adapter with ``use_asa`` (``t0 = init_warmup``, ``t1 = final_warmup``, ``T`` = its subspaces over all layers,
``N = asa_target_subspaces``), while ``t0 <= t <= t1``:

1. every step, for each subspace ``k`` whose ``A_k``/``B_k`` has a gradient (element-wise, ``p`` the parameter)::

       I = |p ⊙ ∇p|,   Ū ← β_u Ū + (1 - β_u) |I - Ī|,   Ī ← β_i Ī + (1 - β_i) I     (Ī, Ū start at 0)

2. when ``t % mask_interval == 0``: the budget ``n(t) = ⌊N + (T - N) · (1 - (t - t0) / (t1 - t0))^e⌋``
   (``e = asa_schedule_exponent``); each subspace with statistics scores ``s_k = mean(Ī_A Ū_A) + mean(Ī_B Ū_B)``,
   the ``n(t)``-th largest score over all layers is the threshold, and only subspaces scoring strictly above it stay
   trainable (PEFT's ``>``: ``n(t) - 1`` subspaces when the scores are distinct); the others are frozen (their
   gradients dropped). Then every statistic is reset.

A frozen subspace gets no gradient, so no statistics and no score: it is never revived (as PEFT).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.adamss.config import AdamssConfig
from deltatune.adamss.layer import AdamssLayer


def budget(step: int, config: AdamssConfig, total: int) -> int | None:
    """``n(t)``: subspaces to keep at ``step`` (``None`` before ``init_warmup``), PEFT's ``_schedule_threshold``."""
    if total == 0 or step < config.init_warmup:
        return None
    if step > config.final_warmup:
        return config.asa_target_subspaces
    progress = 1.0 - (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
    progress = max(0.0, min(1.0, progress))
    return int(config.asa_target_subspaces
               + (total - config.asa_target_subspaces) * (progress ** config.asa_schedule_exponent))


def subspace_scores(layers: list[AdamssLayer], adapter_name: str) -> list[tuple[AdamssLayer, int, torch.Tensor]]:
    """``(layer, k, s_k)`` for every subspace with statistics, in module order."""
    scores = []
    for layer in layers:
        ipt_a, ipt_b = layer.exp_avg_ipt_A[adapter_name], layer.exp_avg_ipt_B[adapter_name]
        unc_a, unc_b = layer.exp_avg_unc_A[adapter_name], layer.exp_avg_unc_B[adapter_name]
        for i in range(layer.num_subspaces[adapter_name]):
            if ipt_a[i] is None or ipt_b[i] is None:
                continue
            scores.append((layer, i, (ipt_a[i] * unc_a[i]).mean() + (ipt_b[i] * unc_b[i]).mean()))
    return scores


def mask_to_budget(layers: list[AdamssLayer], adapter_name: str, keep: int) -> None:
    """Step 2's pruning: only subspaces scoring above the ``keep``-th largest score stay trainable."""
    scores = subspace_scores(layers, adapter_name)
    if not scores:
        return
    values = torch.stack([s for _, _, s in scores])
    threshold = float("-inf") if keep >= len(scores) else -torch.kthvalue(-values, keep)[0].item()
    for layer, i, score in scores:
        active = float(score) > threshold
        layer.asa_active[adapter_name][i] = active
        for p in (layer.adamss_A[adapter_name][i], layer.adamss_B[adapter_name][i]):
            p.requires_grad_(active)
            if not active:
                p.grad = None


def allocate(layers: list[AdamssLayer], adapter_name: str, config: AdamssConfig, global_step: int) -> None:
    """One ASA step (steps 1 and 2 of the module docstring) for ``adapter_name`` over ``layers``."""
    if not layers or not config.init_warmup <= global_step <= config.final_warmup:
        return
    for layer in layers:
        layer.update_importance(adapter_name, config.asa_importance_beta, config.asa_uncertainty_beta)
    if global_step % config.mask_interval != 0:
        return
    keep = budget(global_step, config, sum(layer.num_subspaces[adapter_name] for layer in layers))
    if keep is not None:
        mask_to_budget(layers, adapter_name, keep)
    for layer in layers:
        layer.reset_importance(adapter_name)


def active_subspaces(layers: list[AdamssLayer], adapter_name: str) -> int:
    """How many subspaces of ``adapter_name`` still train."""
    return sum(sum(layer.asa_active.get(adapter_name, [True] * layer.num_subspaces[adapter_name]))
               for layer in layers)


def allocate_in(model: nn.Module, global_step: int) -> None:
    """One ASA step for every active, trainable ``use_asa`` adapter found in ``model``'s AdaMSS layers, with the
    config each layer holds: for a caller that has the adapted model but not the ``PeftModel`` (a ``Trainer``
    callback under ``AdapterTrainer``)."""
    by_adapter: dict[str, list[AdamssLayer]] = {}
    for layer in model.modules():
        if isinstance(layer, AdamssLayer):
            for name, config in layer.asa_config.items():
                if name in layer.active_adapters and not config.inference_mode:
                    by_adapter.setdefault(name, []).append(layer)
    for name, layers in by_adapter.items():
        allocate(layers, name, layers[0].asa_config[name], global_step)
