"""AdaLoRA's rank allocator: importance scores, the budget schedule, and masking.

For every trainable entry ``w`` of ``P``, ``Λ``, ``Q`` the sensitivity is ``I = |w · ∂L/∂w|``, smoothed and
paired with its uncertainty (the paper's eqs. 8-9)::

    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t
    Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|
    s   = Ī_t · Ū_t

Triplet ``i`` of a layer scores ``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)`` (eq. 10). The total budget
``b(t)`` (triplets kept over all layers) stays at ``n · init_r`` for ``t <= tinit``, then falls cubically to
``n · target_r`` at ``t = total_step - tfinal``::

    b(t) = ⌊(b_0 - b_T) · (1 - (t - tinit) / (total_step - tfinal - tinit))³ + b_T⌋

Every ``deltaT`` steps the ``b_0 - b(t)`` lowest-scoring triplets get ``Λ_i = 0`` (they may come back at a later
re-masking). At ``t = total_step - tfinal`` the pattern is fixed and re-applied after every later step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.adalora.config import AdaLoraConfig
    from deltatune.adalora.layer import AdaLoraLayer

    Layers = Sequence[tuple[str, AdaLoraLayer]]

TRIPLET = ("lora_A", "lora_B", "lora_E")


def pattern_key(module_name: str) -> str:
    """The ``rank_pattern`` key of a layer, as PEFT writes it into ``adapter_config.json``."""
    return f"{module_name}.lora_E"


def pattern_module(key: str, adapter_name: str) -> str | None:
    """The module name in a ``rank_pattern`` key: ``<module>.lora_E`` (files) or ``<module>.lora_E.<adapter>``
    (PEFT's in-memory form); ``None`` for anything else."""
    parts = key.split(".")
    if parts[-1] == "lora_E":
        return ".".join(parts[:-1])
    if len(parts) >= 2 and parts[-2] == "lora_E" and parts[-1] == adapter_name:
        return ".".join(parts[:-2])
    return None


def normalized_pattern(pattern: dict[str, list[bool]], adapter_name: str) -> dict[str, list[bool]]:
    """``{module: [keep, ...]}`` from either key form."""
    out: dict[str, list[bool]] = {}
    for key, keep in pattern.items():
        module = pattern_module(key, adapter_name)
        if module is not None:
            out[module] = [bool(k) for k in keep]
    return out


class RankAllocator:
    """The schedule and importance state of one trainable AdaLoRA adapter (not saved with it).

    Args:
        adapter_name: The adapter it allocates.
        config: Its config; ``config.rank_pattern`` is written here after each masking.
    """

    def __init__(self, adapter_name: str, config: AdaLoraConfig) -> None:
        self.adapter_name = adapter_name
        self.config = config
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}  # (module, "lora_A"|...) -> Ī, shaped like w
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}  # -> Ū
        self.calls = 0                # update_and_allocate calls so far
        self.finalized = False        # the final pattern has been fixed
        self.budget: int | None = None  # the budget of the last masking
        self.training_forwards = 0    # forward passes with gradients, counted for the "never driven" warning
        self._counting_layer: int | None = None
        self._warned = False

    # ---- schedule ----------------------------------------------------------------------------
    def budget_schedule(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """``(b(step), mask now?)`` (the cubic schedule above)."""
        c = self.config
        if step <= c.tinit:
            return init_budget, False
        if step > c.total_step - c.tfinal:
            return target_budget, True
        progress = (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget)
        return budget, step % c.deltaT == 0

    # ---- importance --------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, layers: Layers) -> None:
        """Fold this step's ``|w · grad|`` into the EMAs ``Ī`` and ``Ū``.

        Raises:
            ConfigError: no adapter tensor has a gradient (called after ``zero_grad()`` or before ``backward``).
        """
        name = self.adapter_name
        params = [(module, attr, getattr(layer, attr)[name]) for module, layer in layers for attr in TRIPLET]
        if params and all(p.grad is None for _, _, p in params):
            raise ConfigError(
                f"update_and_allocate(): the AdaLoRA adapter {name!r} has no gradients. It scores triplets by "
                "|w * grad|: call it after loss.backward() and optimizer.step(), before optimizer.zero_grad()"
            )
        b1, b2 = self.config.beta1, self.config.beta2
        for module, attr, p in params:
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # unused layer: no signal
            key = (module, attr)
            avg = self.exp_avg_ipt.get(key)
            if avg is None or avg.shape != p.shape:  # first step, or the layer was rebuilt
                avg = self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            elif avg.device != p.device:  # restored from a checkpoint onto another device
                avg = self.exp_avg_ipt[key] = avg.to(p.device)
                self.exp_avg_unc[key] = self.exp_avg_unc[key].to(p.device)
            avg.mul_(b1).add_(ipt, alpha=1 - b1)
            self.exp_avg_unc[key].mul_(b2).add_((ipt - avg).abs_(), alpha=1 - b2)

    def triplet_scores(self, layers: Layers) -> list[torch.Tensor]:
        """``S: (r,)`` per layer: ``s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)`` with ``s = Ī · Ū``."""
        name = self.adapter_name
        scores = []
        for module, layer in layers:
            s = {}
            for attr in TRIPLET:
                p = getattr(layer, attr)[name]
                avg = self.exp_avg_ipt.get((module, attr))
                s[attr] = (avg.to(p.device) * self.exp_avg_unc[(module, attr)].to(p.device)
                           if avg is not None and avg.shape == p.shape else torch.zeros_like(p))
            scores.append(s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return scores

    # ---- masking -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, layers: Layers, budget: int) -> dict[str, list[bool]]:
        """Keep the ``budget`` best triplets over all layers (``Λ_i = 0`` for the rest); return the pattern.

        Exactly ``budget`` survive: ties at the threshold are broken by position (PEFT masks every triplet
        ``<=`` the k-th score, which prunes more than asked when scores tie, e.g. at 0).
        """
        self.budget = budget
        scores = self.triplet_scores(layers)
        flat = torch.cat([s.float().cpu() for s in scores]) if scores else torch.zeros(0)
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        n_pruned = flat.numel() - budget
        if n_pruned > 0:
            keep[torch.argsort(flat, stable=True)[:n_pruned]] = False
        pattern: dict[str, list[bool]] = {}
        start = 0
        for (module, layer), s in zip(layers, scores, strict=True):
            kept = keep[start:start + s.numel()]
            start += s.numel()
            e = layer.lora_E[self.adapter_name]
            e.masked_fill_(~kept.to(e.device).view(-1, 1), 0.0)
            pattern[pattern_key(module)] = layer.full_pattern(self.adapter_name, kept.tolist())
        return pattern

    @torch.no_grad()
    def mask_with_pattern(self, layers: Layers, pattern: dict[str, list[bool]]) -> None:
        """Re-apply a fixed pattern (the optimizer moves masked ``Λ_i`` off zero; this puts them back)."""
        by_module = normalized_pattern(pattern, self.adapter_name)
        for module, layer in layers:
            full = by_module.get(module)
            keep = None if full is None else layer.held_pattern(self.adapter_name, full)
            if keep is None:
                continue
            e = layer.lora_E[self.adapter_name]
            e.masked_fill_(~torch.tensor(keep, dtype=torch.bool, device=e.device).view(-1, 1), 0.0)

    # ---- one training step -------------------------------------------------------------------
    def update_and_allocate(self, layers: Layers, global_step: int) -> None:
        """Score, and mask when the schedule says so; ``config.rank_pattern`` follows every masking.

        ``global_step`` counts optimizer steps: the final pattern is fixed on the first call with
        ``global_step >= total_step - tfinal`` (PEFT: exactly at that step) and re-applied on later calls.
        """
        c = self.config
        self.calls += 1
        end = c.total_step - c.tfinal
        init_budget = sum(layer.lora_E[self.adapter_name].shape[0] for _, layer in layers)
        target_budget = c.target_r * len(layers)
        if global_step < end:
            self.update_importance(layers)
            budget, mask_now = self.budget_schedule(global_step, init_budget, target_budget)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(layers, budget)
        elif not self.finalized:
            if not self.exp_avg_ipt:  # never scored before (first call comes this late): use this step's grads
                self.update_importance(layers)
            c.rank_pattern = self.mask_to_budget(layers, target_budget)
            self.finalized = True
            self.exp_avg_ipt.clear()  # no more scoring: free the EMAs
            self.exp_avg_unc.clear()
        elif c.rank_pattern:
            self.mask_with_pattern(layers, c.rank_pattern)

    # ---- "the schedule is never driven" ------------------------------------------------------
    def note_training_forward(self, layer: object) -> None:
        """Count training forward passes (one layer counts them); warn once the count passes ``total_step``
        with :meth:`update_and_allocate` never called: then no rank is ever allocated."""
        if self._counting_layer is None:
            self._counting_layer = id(layer)
        if id(layer) != self._counting_layer:
            return
        self.training_forwards += 1
        if not self.calls and not self._warned and self.training_forwards > self.config.total_step:
            self._warned = True
            warnings.warn(
                f"AdaLoRA adapter {self.adapter_name!r}: {self.training_forwards} training forward passes, more "
                f"than total_step={self.config.total_step}, and update_and_allocate() was never called, so no "
                f"rank was allocated (every layer still has init_r={self.config.init_r}). Call "
                "model.update_and_allocate(step) after each optimizer.step() and before zero_grad(), or pass "
                "deltatune.adalora.AdaLoraCallback() to transformers.Trainer(callbacks=[...])",
                stacklevel=2,
            )


def orthogonal_penalty(layers: Layers, adapter_name: str) -> torch.Tensor | None:
    """``R = mean over layers and over {P, Q} of ||PᵀP - I||_F, ||QQᵀ - I||_F`` (the paper's eq. 4), keeping
    the triplets close to an SVD so that masking ``Λ_i`` removes one direction; ``None`` without layers."""
    terms = []
    for _, layer in layers:
        q, p = layer.lora_A[adapter_name], layer.lora_B[adapter_name]  # Q: (r, in), P: (out, r)
        for gram in (q @ q.T, p.T @ p):                                 # (r, r) each
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    if not terms:
        return None
    device = terms[0].device
    return torch.stack([t.to(device) for t in terms]).mean()
