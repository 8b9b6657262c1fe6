"""LoRA layers: the low-rank update ``ΔW = s · B A`` beside a frozen layer.

Shapes: ``A: (r, in)``, ``B: (out, r)``, ``x: (..., in)``; the scaling ``s`` is ``alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Computing ``B (A x)`` keeps every intermediate ``(..., r)``:
the dense ``ΔW`` is only formed to merge (or by a variant that needs it, such as DoRA's weight norm).

An adapter that is not plain LoRA has a variant (:mod:`deltatune.lora.variants`; DoRA in
:mod:`deltatune.lora.dora`, for one), which the layer asks at each point where its math differs: creation,
merge and unmerge, the composed forward (run after the other adapters where the variant asks), the fused
single-node path and the row scale of mixed-adapter batches. The single-node kernels and the dropout sampling
live in :mod:`deltatune.lora.kernels`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftWarning
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError
from deltatune.lora import dora
from deltatune.lora.kernels import LoraDropoutBranch, LoraLinearNode, autocast_dtype
from deltatune.lora.variants import LoraVariant, variant_containers, variant_for
from deltatune.quantization import dequantize_weight

PISSA_NITER_SEED = 0  # the seed of pissa_niter_N's randomised SVD (see LoraLinear._initial_factors)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:
        return None


BASE_ROW = "__base__"


class _SlotTable:
    """Preallocated adapter slots of one LoRA layer for mixed-adapter batches (as Punica and S-LoRA keep them).

    ``a: (cap, r_max, in)``, ``b: (cap, out, r_max)`` (the scaling folded in), ``bias: (cap, out)`` and the variant
    row ``scale: (cap, out)`` (DoRA's ``m / n``; ones for plain LoRA). Slot 0 is the base model (zeros, scale 1)
    and is never given out; ranks are zero-padded to ``r_max``, which leaves every product exact. An adapter keeps
    its slot across calls, so a decoding step gathers rows by slot index instead of stacking every adapter again.

    ``source[name]`` records what a slot was filled from: ``(r, scaling)``, the input tensors themselves (never
    their ``id()``, which a new tensor may reuse once the old one is freed), their ``_version`` (bumped by every
    in-place write autograd sees) and ``data_ptr()`` (changed by a ``.data =`` assignment). A call refills a slot
    only when one of them differs, so an optimizer step, ``load_state_dict`` or a reload is seen; only an
    in-place write through ``.data`` is invisible, which is why deltatune's own writers bump the version or
    call ``_clear_row_cache``.
    """

    def __init__(self, cap: int, r_max: int, in_dim: int, out_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.a = torch.zeros(cap, r_max, in_dim, device=device, dtype=dtype)
        self.b = torch.zeros(cap, out_dim, r_max, device=device, dtype=dtype)
        self.bias = torch.zeros(cap, out_dim, device=device, dtype=dtype)
        self.scale = torch.ones(cap, out_dim, device=device, dtype=dtype)
        self.slot: dict[str, int] = {}
        self.source: dict[str, tuple] = {}
        self.free = list(range(cap - 1, 0, -1))  # pop() hands out the lowest free slot first

    @property
    def cap(self) -> int:
        return self.a.shape[0]

    @property
    def r_max(self) -> int:
        return self.a.shape[1]

    def fits(self, in_dim: int, out_dim: int, device: torch.device, dtype: torch.dtype) -> bool:
        return (self.a.shape[2] == in_dim and self.b.shape[1] == out_dim and self.a.device == device
                and self.a.dtype == dtype)

    def grow(self, cap: int, r_max: int) -> None:
        """Reallocate to at least ``cap`` slots of rank ``r_max``, keeping every filled slot."""
        cap, r_max = max(cap, self.cap), max(r_max, self.r_max)
        if cap == self.cap and r_max == self.r_max:
            return
        old_cap, old_r = self.cap, self.r_max
        a, b, bias, scale = self.a, self.b, self.bias, self.scale
        self.a = a.new_zeros(cap, r_max, a.shape[2])
        self.b = b.new_zeros(cap, b.shape[1], r_max)
        self.bias = bias.new_zeros(cap, bias.shape[1])
        self.scale = scale.new_ones(cap, scale.shape[1])
        self.a[:old_cap, :old_r] = a
        self.b[:old_cap, :, :old_r] = b
        self.bias[:old_cap] = bias
        self.scale[:old_cap] = scale
        self.free = list(range(cap - 1, old_cap - 1, -1)) + self.free

    def release(self, name: str) -> None:
        """Give ``name``'s slot back: zero it and drop the references to its tensors."""
        self.source.pop(name, None)
        i = self.slot.pop(name, None)
        if i is None:
            return
        self.a[i].zero_()
        self.b[i].zero_()
        self.bias[i].zero_()
        self.scale[i].fill_(1)
        self.free.append(i)


def _gather_rows(a_all: torch.Tensor, b_all: torch.Tensor, index: torch.Tensor,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``A: (batch, rank, in)`` and ``B^T: (batch, rank, out)`` from ``(k, r_max, in)``/``(k, out, r_max)``
    stacks. ``index_select`` then a slice: advanced indexing combined with a slice (``b[index, :, :rank]``) runs a
    generic gather some hundred times slower, which once cost more than the matmuls."""
    a_rows, b_rows = a_all.index_select(0, index), b_all.index_select(0, index)
    if rank < b_all.shape[2]:
        a_rows, b_rows = a_rows[:, :rank], b_rows[:, :, :rank]
    return a_rows, b_rows.transpose(1, 2)


def _unchanged(source: tuple, values: tuple, tensors: list[torch.Tensor]) -> bool:
    """Whether a slot filled from ``source`` still holds ``values``/``tensors`` (see :class:`_SlotTable`)."""
    old_values, old_tensors, versions, pointers = source
    return (old_values == values and len(old_tensors) == len(tensors)
            and all(t is o and t._version == v and t.data_ptr() == p
                    for t, o, v, p in zip(tensors, old_tensors, versions, pointers)))


class LoraBiasMergeError(MergeError, RuntimeError):
    """Merging a ``lora_bias`` adapter into a base layer without a bias (a ``RuntimeError`` too, as PEFT raises)."""


class GroupedConvMergeError(MergeError, NotImplementedError):
    """Merging LoRA into a grouped convolution: not defined (a ``NotImplementedError`` too, as PEFT raises)."""


class _WithVariantContainers:
    """``LoraLayer.adapter_layer_names``: LoRA's own containers, then those of every known variant (DoRA's
    ``lora_magnitude_vector``), so that a variant's tensors are saved, moved, frozen and deleted as LoRA's are
    without the layer naming them. Read on the class too (the registry's list of saved containers)."""

    def __init__(self, own: tuple[str, ...]) -> None:
        self.own = own

    def __get__(self, obj: object, owner: type | None = None) -> tuple[str, ...]:
        return self.own + tuple(c for c in variant_containers() if c not in self.own)


class LoraLayer(AdapterLayer):
    """Shared LoRA bookkeeping; :class:`LoraLinear`, :class:`LoraEmbedding`, :class:`LoraConv` add the math.

    ``layer_kind`` (``"linear"``, ``"embedding"``, ``"conv"``) tells a variant which form of its math applies.
    """

    adapter_layer_names = _WithVariantContainers(("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias", "use_rslora",
                         "lora_variant")
    layer_kind: str | None = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        for container in variant_containers():  # DoRA's lora_magnitude_vector, as PEFT's layers all have it
            setattr(self, container, nn.ModuleDict())
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}  # to recompute the initial scaling (set_scale, unscale_layer)
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        # adapter -> its variant (DoRA...), for adapters that are not plain LoRA (deltatune.lora.variants)
        self.lora_variant: dict[str, LoraVariant] = {}
        self._merge_state: dict[str, torch.Tensor] = {}  # what a variant's merge keeps to unmerge exactly
        # The adapter slots of mixed-adapter batches (see _SlotTable); allocated at the first such batch.
        self._slots: _SlotTable | None = None

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, **variant_flags: bool) -> None:
        """Create adapter ``adapter_name`` with rank ``r`` and initialise it. ``use_dora`` and ``variant_flags``
        (the other flags of :mod:`deltatune.lora.variants`) choose the variant."""
        if r <= 0:
            raise ConfigError(f"rank must be positive, got r={r}")
        variant_cls = variant_for({"use_dora": use_dora, **variant_flags})
        if variant_cls is not None and lora_bias and not variant_cls.lora_bias:
            raise ConfigError(f"{variant_cls.label} with lora_bias=True is not supported; drop one of them")
        self._release_slot(adapter_name)  # a re-created adapter refills its slot; the other slots stay valid
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias
        self._create_adapter(adapter_name, r, lora_bias)  # refuses lora_bias where it cannot train (Embedding)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # PEFT's warning (and category): the adapter trains, but cannot be merged
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} has no "
                "bias. This means that merging LoRA weights won't be possible.", PeftWarning, stacklevel=4)
        self._place_adapter(adapter_name)
        self._init_weights(adapter_name, init_lora_weights)
        self.lora_variant.pop(adapter_name, None)
        if variant_cls is not None:
            variant = variant_cls.for_layer(self)  # refuses a kind of layer it does not apply to
            for container in variant_cls.containers:  # a variant registered after this layer was made
                if container not in self._modules:
                    self.add_module(container, nn.ModuleDict())
            variant.init(self, adapter_name)
            self.lora_variant[adapter_name] = variant
        self.set_adapter(self.active_adapters or [adapter_name])

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def _place_adapter(self, adapter_name: str) -> None:
        """Put the new tensors on the base weight's device; keep them fp32 over a half-precision base."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(item.data.to(weight.device, dtype))
                else:
                    item.to(weight.device, dtype)

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        if init is False:
            return  # both factors keep their random init: the adapter is not an identity (for tests)
        if isinstance(init, str) and init.startswith("pissa"):
            return self._init_pissa(adapter_name, init)
        if init == "olora":
            return self._init_olora(adapter_name)
        if init == "mica":  # B = minor left singular vectors of W (frozen), A = 0
            from deltatune.lora.mica import init_mica

            return init_mica(self, adapter_name)
        if init == "orthogonal":
            from deltatune.lora.init import init_orthogonal

            return init_orthogonal(self, adapter_name)
        if init in ("eva", "corda", "lora_ga", "loftq"):  # each in its own module (deltatune.lora.init)
            from deltatune.lora.init import init_module

            return init_module(init).init_layer(self, adapter_name)
        if adapter_name in self.lora_A:
            a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
            if init == "gaussian":
                nn.init.normal_(a.weight, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            if b.bias is not None:
                nn.init.zeros_(b.bias)
        else:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _init_pissa(self, adapter_name: str, init: str) -> None:
        raise ConfigError(f"init_lora_weights={init!r} is supported on Linear layers only, not {type(self).__name__}")

    def _init_olora(self, adapter_name: str) -> None:
        raise ConfigError(f"init_lora_weights='olora' is supported on Linear layers only, not {type(self).__name__}")

    # ---- PEFT's LoraLayer API: scaling and re-initialisation -----------------------------------
    def _initial_scaling(self, adapter_name: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA): the scaling the adapter was created with."""
        r, alpha = self.r[adapter_name], self.lora_alpha[adapter_name]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter_name) else alpha / r

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set ``adapter``'s scaling to ``scale`` times its initial one (``s = scale · alpha / r``); an adapter
        this layer does not hold is ignored (PEFT's)."""
        if adapter in self.scaling:
            self._clear_row_cache()  # mixed-adapter batches cache each adapter's scaling
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scaling of every active adapter on this layer by ``scale``."""
        if scale == 1:
            return
        self._clear_row_cache()
        for name in self._active_lora():
            self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the current scaling of every active adapter on this layer by ``scale``; ``None`` restores the
        initial scaling (``alpha / r``)."""
        self._clear_row_cache()
        for name in self._active_lora():
            self.scaling[name] = self._initial_scaling(name) if scale is None else self.scaling[name] / scale

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """Re-initialise ``adapter_name``'s factors in place as PEFT's ``reset_lora_parameters``: ``True``: ``A``
        Kaiming-uniform, ``B = 0`` (embeddings: ``A = 0``, ``B`` normal); ``"gaussian"``: ``A ~ N(0, 1/r)``;
        ``False``: unchanged.

        Raises:
            ConfigError: another ``init_lora_weights`` (PiSSA, OLoRA... rewrite the base: create the adapter
                with that init instead).
        """
        if init_lora_weights is False:
            return
        if init_lora_weights is not True and str(init_lora_weights).lower() != "gaussian":
            raise ConfigError(f"Unknown initialization init_lora_weights={init_lora_weights!r} for "
                              "reset_lora_parameters: use True, 'gaussian' or False")
        if adapter_name in self.r:
            self._clear_row_cache()
            with torch.no_grad():
                self._init_weights(adapter_name, True if init_lora_weights is True else "gaussian")

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """LoRA is LoRA; so is every variant's adapter, as PEFT says (its update is still a weight change)."""
        return True

    # ---- mixed-adapter batches -----------------------------------------------------------------
    def _row_index(self, batch: int) -> tuple[list[str], list[str]]:
        """Each row's adapter name (``"__base__"`` or an adapter this layer lacks: the base) and the adapters
        present in this batch, sorted."""
        names = self._row_names(batch)
        return names, sorted({n for n in names if n in self.r})

    def _stack_inputs(self, present: list[str], a_of, b_of) -> list[torch.Tensor]:
        """Every tensor the stacks are computed from: each adapter's A, B, bias and what its variant's row scale
        reads (DoRA: the magnitude and the base weight)."""
        tensors: list[torch.Tensor] = []
        for n in present:
            tensors += [a_of(n), b_of(n)]
            if self.lora_bias.get(n):
                tensors.append(self.lora_B[n].bias)
            if (variant := self.lora_variant.get(n)) is not None:
                tensors += variant.row_scale_inputs(self, n)
        return tensors

    def _row_scale(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s row scale in a mixed batch (its variant's; ``None``: 1, plain LoRA)."""
        variant = self.lora_variant.get(name)
        return None if variant is None else variant.row_scale(self, name)

    def _stacks(self, batch: int, a_of, b_of, in_dim: int, out_dim: int, device: torch.device):
        """The per-row weights of a mixed batch of ``batch`` rows, or ``None`` when no row has an adapter here.

        Returns ``(present, index, rank, (a, b, bias, scale))``: ``a: (k, r, in)``, ``b: (k, out, r)`` (scaling
        folded in), ``bias: (k, out)`` and the variants' row scale ``(k, out)``, and ``index: (batch,)`` the row of
        each batch row in them (0 = the base: zeros, scale 1); only the first ``rank`` (the largest rank present)
        columns of ``a``/``b`` matter.

        For inference (grad disabled, or no present adapter's weights require grad) these are the layer's
        persistent slots (:class:`_SlotTable`): no per-call restacking, so a decoding step costs the same for one
        adapter or sixteen. When gradients are wanted the factors are stacked differentiably for this call,
        so ``A``/``B``/bias/magnitude get the same gradients as running each row alone.
        """
        names, present = self._row_index(batch)
        if not present:
            return None
        dtype = a_of(present[0]).dtype
        rank = max(self.r[n] for n in present)
        inputs = [self._stack_inputs([n], a_of, b_of) for n in present]
        if torch.is_grad_enabled() and any(t.requires_grad for own in inputs for t in own):
            slot = {n: i for i, n in enumerate(present, start=1)}
            index = torch.tensor([slot.get(n, 0) for n in names], device=device)
            return present, index, rank, self._grad_stacks(present, a_of, b_of, rank, in_dim, out_dim, device,
                                                           dtype)
        table = self._slots
        if table is None or not table.fits(in_dim, out_dim, device, dtype):
            table = self._slots = _SlotTable(len(self.r) + 1, max(self.r.values()), in_dim, out_dim, device, dtype)
        if rank > table.r_max:
            table.grow(table.cap, rank)
        for n, own in zip(present, inputs):
            values = (self.r[n], self.scaling[n], bool(self.lora_bias.get(n)), type(self.lora_variant.get(n)))
            source = table.source.get(n)
            if source is None or not _unchanged(source, values, own):
                self._fill_slot(table, n, a_of, b_of, values, own)
        slot = {n: table.slot[n] for n in present}
        index = torch.tensor([slot.get(n, 0) for n in names], device=device)
        return present, index, rank, (table.a, table.b, table.bias, table.scale)

    def _fill_slot(self, table: _SlotTable, name: str, a_of, b_of, values: tuple,
                   tensors: list[torch.Tensor]) -> None:
        """(Re)write ``name``'s slot from its current weights, taking a free slot (growing the table) if needed."""
        if name not in table.slot:
            if not table.free:
                table.grow(2 * table.cap, table.r_max)
            table.slot[name] = table.free.pop()
        i, r, s = table.slot[name], self.r[name], self.scaling[name]
        with torch.no_grad():
            table.a[i].zero_()
            table.b[i].zero_()
            table.a[i, :r] = a_of(name)
            table.b[i, :, :r] = b_of(name) * s
            if self.lora_bias.get(name):
                table.bias[i] = self.lora_B[name].bias * s
            else:
                table.bias[i].zero_()
            if (scale := self._row_scale(name)) is not None:
                table.scale[i] = scale.flatten()
            else:
                table.scale[i].fill_(1)
        table.source[name] = (values, tensors, [t._version for t in tensors], [t.data_ptr() for t in tensors])

    def _grad_stacks(self, present: list[str], a_of, b_of, rank: int, in_dim: int, out_dim: int,
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The stacks of one call built with autograd (row 0 the base), for mixed batches that need gradients."""
        zero_out = torch.zeros(out_dim, device=device, dtype=dtype)
        a = [torch.zeros(rank, in_dim, device=device, dtype=dtype)]
        b = [torch.zeros(out_dim, rank, device=device, dtype=dtype)]
        bias, scale = [zero_out], [torch.ones(out_dim, device=device, dtype=dtype)]
        for n in present:
            pad, s = rank - self.r[n], self.scaling[n]
            a.append(F.pad(a_of(n).to(dtype), (0, 0, 0, pad)))
            b.append(F.pad(b_of(n).to(dtype) * s, (0, pad)))
            bias.append(self.lora_B[n].bias.to(dtype) * s if self.lora_bias.get(n) else zero_out)
            row_scale = self._row_scale(n)
            scale.append(scale[0] if row_scale is None else row_scale.flatten().to(dtype))
        return torch.stack(a), torch.stack(b), torch.stack(bias), torch.stack(scale)

    def _release_slot(self, adapter_name: str) -> None:
        """Free ``adapter_name``'s slot; with no slot left in use the whole table goes (its memory with it)."""
        if self._slots is None:
            return
        self._slots.release(adapter_name)
        if not self._slots.slot:
            self._slots = None

    def delete_adapter(self, adapter_name: str) -> None:
        self._release_slot(adapter_name)
        table = self._slots
        kept = dict(table.source) if table is not None else {}
        super().delete_adapter(adapter_name)
        # The base class marks every slot stale; the other adapters' slots still hold their weights (a base
        # weight changed by an unmerge shows in DoRA slots' sources anyway).
        if table is not None and self._slots is table:
            table.source.update(kept)

    def _clear_row_cache(self) -> None:
        """Mark every slot stale (refilled at its next use; the memory stays allocated): called on loads and
        base-weight writes, which may write through ``.data`` without bumping a tensor's version."""
        if self._slots is not None:
            self._slots.source.clear()

    # ---- helpers -----------------------------------------------------------------------------
    def _active_lora(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.r]

    def _forget_merge_state(self, adapter_name: str) -> None:
        self._merge_state.pop(adapter_name, None)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``W + ΔW``, or what the adapter's variant merges (DoRA: ``(W + ΔW)`` rescaled row by row).

        Raises:
            MergeError: the variant is not a weight change (its ``merge_refusal``), or see
                :meth:`_check_bias_mergeable`; before anything is written.
        """
        variant = self.lora_variant.get(adapter_name)
        if variant is not None and variant.merge_refusal is not None:
            raise MergeError(f"adapter {adapter_name!r} cannot be merged: {variant.merge_refusal}; keep it unmerged")
        self._check_bias_mergeable(adapter_name)  # before merge() writes the weight
        if variant is None:
            return weight + self.get_delta_weight(adapter_name).to(weight.dtype)
        return variant.merged_weight(self, weight, adapter_name)

    def _take_out(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight`` with the merged adapter ``adapter_name`` taken out, out of place (LoRA: ``- ΔW``); the merge
        state its variant kept stays."""
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return weight - self.get_delta_weight(adapter_name).to(weight.dtype)
        return variant.unmerged_weight(self, weight, adapter_name)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        new = self._take_out(weight, adapter_name)
        self._merge_state.pop(adapter_name, None)  # the merge is undone: what it kept is no longer needed
        return new

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight (storage layout) as ``forward`` sees it: with every merged adapter taken out, last merged
        first. A variant's merge may need it (DoRA's norm), since after a first merge the base weight holds that
        adapter too."""
        weight = self.read_base_weight()
        for name in reversed(self.merged_adapters):
            weight = self._take_out(weight, name)
        return weight

    def _check_bias_mergeable(self, adapter_name: str) -> None:
        """Refuse merging a ``lora_bias`` adapter into a base layer without a bias, before anything is written."""
        if self.lora_bias.get(adapter_name) and getattr(self.base_layer, "bias", None) is None:
            raise LoraBiasMergeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                f"({type(self.base_layer).__name__}); keep adapter {adapter_name!r} unmerged")

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``b + s · b_B`` for a ``lora_bias`` adapter (a new tensor), else ``None``: the bias is not merged."""
        if not self.lora_bias.get(adapter_name):
            return None
        self._check_bias_mergeable(adapter_name)
        return bias + self.lora_B[adapter_name].bias.detach().to(bias.dtype) * self.scaling[adapter_name]

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        if not self.lora_bias.get(adapter_name):
            return
        self._check_bias_mergeable(adapter_name)
        base_bias = self.base_layer.bias
        base_bias.data += sign * self.lora_B[adapter_name].bias.data * self.scaling[adapter_name]


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (``W: (out, in)``) or ``transformers``' ``Conv1D`` (``W: (in, out)``).

    ``y = base(x) + s · B(A(dropout(x)))`` with ``x: (..., in)`` and ``y: (..., out)``.
    """

    layer_kind = "linear"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        elif self.quantized:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.out_features, self.in_features = base_layer.weight.shape

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def _base_weight(self) -> torch.Tensor:
        """The base weight as dense ``(out, in)`` whatever its storage layout (or quantisation)."""
        if self.quantized:
            return dequantize_weight(self.base_layer)
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _lora_weight(self, adapter_name: str) -> torch.Tensor:
        """``B A: (out, in)``, unscaled."""
        return self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self._lora_weight(adapter_name) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    # ---- initialisations that move the principal part of W into the adapter ------------------
    def _set_residual(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Install ``A, B`` and leave ``W - s B A`` in the base, so the layer's output is unchanged."""
        self.lora_A[adapter_name].weight.data = a.contiguous().to(self.lora_A[adapter_name].weight.dtype)
        self.lora_B[adapter_name].weight.data = b.contiguous().to(self.lora_B[adapter_name].weight.dtype)
        self._shift_base(adapter_name, a, b, sign=-1)

    def _shift_base(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor, sign: int) -> None:
        """Write ``W + sign · s B A`` into the base weight (computed in fp32, stored in the base's dtype)."""
        s = self.scaling[adapter_name]
        weight = self._base_weight().data.float() + (sign * s) * (b.float() @ a.float())
        weight = weight.T if self.fan_in_fan_out else weight
        self.write_base_weight(weight if self.quantized else weight.to(self.base_layer.weight.dtype))

    def _initial_factors(self, adapter_name: str, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``A0: (r, in), B0: (out, r)`` (fp32) that PiSSA (``"pissa"``, ``"pissa_niter_N"``) or OLoRA take out of the
        current base weight."""
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        w = self._base_weight().data.float()
        if init == "olora":  # OLoRA (Büyükakyüz, 2024): B = Q[:, :r], A = R[:r] from the QR decomposition of W
            q, rr = torch.linalg.qr(w)
            return rr[:r], q[:, :r]
        # PiSSA (Meng et al., 2024): A, B from the top-r singular triplets of W
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        else:  # "pissa_niter_N": randomised SVD with N subspace iterations (fast on big matrices)
            # Drawn from a fixed seed in a forked RNG (PEFT draws from the global one): the same W gives the same
            # factors, so the residual is rebuilt exactly when the adapter is loaded again, and creating an adapter
            # leaves the caller's random stream alone.
            fork = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
            with torch.random.fork_rng(**fork):
                torch.manual_seed(PISSA_NITER_SEED)
                u, sv, v = torch.svd_lowrank(w, q=r, niter=int(init.rsplit("_", 1)[-1]))
            vh = v.T
        root = torch.sqrt(sv[:r] / s)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]

    def _init_pissa(self, adapter_name: str, init: str) -> None:
        a, b = self._initial_factors(adapter_name, init)
        self._set_residual(adapter_name, a=a, b=b)

    def _init_olora(self, adapter_name: str) -> None:
        a, b = self._initial_factors(adapter_name, "olora")
        self._set_residual(adapter_name, a=a, b=b)

    def rebuild_residual(self, adapter_name: str, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the (original) base weight into the PiSSA/OLoRA residual ``W - s B0 A0`` of ``adapter_name``, leaving
        its (loaded) ``A, B`` alone; returns ``(A0, B0)``, which :meth:`restore_base` adds back. What PEFT's load
        does (it re-runs the init on the base it is given, then loads ``A, B``)."""
        a, b = self._initial_factors(adapter_name, init)
        self._shift_base(adapter_name, a, b, sign=-1)
        return a, b

    def restore_base(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Undo :meth:`rebuild_residual` (up to rounding in the base's dtype)."""
        self._shift_base(adapter_name, a, b, sign=+1)

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Pick the path, run it: one adapter over a plain dense base as a single autograd node
        (:meth:`_fast_path`); else the base output, then each adapter's update. Adapters whose variant runs
        ``after_others`` are left out of that choice and applied last, each on the output so far."""
        active = self._active_lora()
        last = [n for n in active if (v := self.lora_variant.get(n)) is not None and v.after_others]
        if last:
            active = [n for n in active if n not in last]
        result = self._fast_path(x, active)
        if result is None:
            result = self._forward_composed(x, active, *args, **kwargs)
        for name in last:  # on the raw input: such a variant casts (and slices) what it uses itself
            result = self.lora_variant[name].forward(self, name, x, result)
        return result

    def _fast_path(self, x: torch.Tensor, active: list[str]) -> torch.Tensor | None:
        """The whole layer as one autograd node when one adapter (``active``) is: its variant's kernel (DoRA's), or
        for plain LoRA over a plain dense base :class:`LoraLinearNode` (dropout included); ``None`` where neither
        applies."""
        if len(active) != 1:
            return None
        name = active[0]
        if (variant := self.lora_variant.get(name)) is not None:
            return variant.fast_path(self, name, x)
        if not self._plain_dense_base(x, name, autocast_ok=True, adapter_dtype_ok=True):
            return None
        dropout, b = self.lora_dropout[name], self.lora_B[name]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        return LoraLinearNode.apply(x, self._base_weight(), self.base_layer.bias, self.lora_A[name].weight,
                                    b.weight, b.bias, self.scaling[name], p, autocast_dtype(x))

    def _forward_composed(self, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
        """``base(x)``, then each adapter of ``active`` in turn: ``+ s · B A dropout(x)``, or its variant's
        ``forward``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in active:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout, s = self.lora_dropout[name], self.scaling[name]
            # the adapter's own dtype, unless disable_input_dtype_casting asked to leave x alone (hooks cast)
            h = x.to(lora_a.weight.dtype) if self.cast_input_dtype_enabled else x
            if (variant := self.lora_variant.get(name)) is not None:
                result = variant.forward(self, name, h, result)
            elif self.training and isinstance(dropout, nn.Dropout) and torch.is_grad_enabled():
                result = result + LoraDropoutBranch.apply(h, lora_a.weight, lora_b.weight, lora_b.bias, dropout.p, s)
            else:
                result = result + lora_b(lora_a(dropout(h))) * s
        return result.to(out_dtype)

    def _plain_dense_base(self, x: torch.Tensor, adapter_name: str, autocast_ok: bool = False,
                          adapter_dtype_ok: bool = False) -> bool:
        """A plain ``nn.Linear`` or ``transformers``' ``Conv1D`` base (no hooks, not quantized) in the input's and
        the adapter's dtype, so that the layer can run as one custom autograd node (on ``W`` seen as ``(out, in)``).
        Under autocast (``autocast_ok``: the node casts its operands to the autocast dtype itself) the dtypes may
        differ but must be floating; with ``adapter_dtype_ok`` the adapter may have its own floating dtype (fp32
        adapters over a bf16 base, computed in fp32 as PEFT does)."""
        base, w = self.base_layer, self.base_layer.weight
        if (type(base) not in (nn.Linear, _conv1d_type()) or base._forward_hooks or base._forward_pre_hooks
                or type(w) is not nn.Parameter):
            return False
        a = self.lora_A[adapter_name].weight
        if torch.is_autocast_enabled(x.device.type):
            return autocast_ok and x.is_floating_point() and w.is_floating_point() and a.is_floating_point()
        return w.dtype == x.dtype and (a.dtype == w.dtype or (adapter_dtype_ok and a.is_floating_point()))

    def _dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """DoRA's ``||W + s B A||_row: (out,)`` as its fused path computes it (:func:`dora.weight_norm`)."""
        return dora.weight_norm(self, adapter_name)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row ``i`` of the batch through its own adapter, in two batched matmuls.

        ``y_i = c_i ⊙ (W x_i + s_i B_i A_i x_i) + b + s_i b_i`` with ``x: (batch, ..., in)`` and ``c_i`` the
        adapter's variant row scale (DoRA's ``m_i / n_i``; 1 for plain LoRA); ``A_i, B_i`` are gathered per row
        from the zero-padded stacks, so there is no Python loop over adapters.
        """
        result = self.base_layer(x, *args, **kwargs)
        stacks = self._stacks(x.shape[0], lambda n: self.lora_A[n].weight, lambda n: self.lora_B[n].weight,
                              self.in_features, self.out_features, x.device)
        if stacks is None:
            return result
        present, index, rank, (a_all, b_all, bias_all, scale_all) = stacks
        a_rows, b_rows = _gather_rows(a_all, b_all, index, rank)                    # (batch, rank, in/out)
        rows = x.to(a_all.dtype).reshape(x.shape[0], -1, x.shape[-1])               # (batch, T, in)
        h = torch.bmm(rows, a_rows.transpose(1, 2))                                 # (batch, T, rank)
        out = result.reshape(*rows.shape[:2], -1)                                   # (batch, T, out)
        has_bias = any(self.lora_bias.get(n) for n in present)
        if any(n in self.lora_variant for n in present):
            delta = torch.bmm(h, b_rows)
            if has_bias:
                delta = delta + bias_all[index][:, None, :]
            bias = self.bias
            scale = scale_all[index][:, None, :]
            base = out if bias is None else out - bias
            out = scale * (base + delta) + (0 if bias is None else bias)
        elif out.dtype == h.dtype:
            out = torch.baddbmm(out, h, b_rows)  # base output + B_i (A_i x_i) in one pass
            if has_bias:
                out = out + bias_all[index][:, None, :]
        else:
            delta = torch.bmm(h, b_rows)
            if has_bias:
                delta = delta + bias_all[index][:, None, :]
            out = out + delta.to(out.dtype)
        return out.reshape(result.shape).to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (``W: (num_embeddings, dim)``).

    ``y = W[ids] + s · A^T[ids] B^T`` with ``lora_embedding_A: (r, num_embeddings)`` and
    ``lora_embedding_B: (dim, r)``: a row lookup in ``A^T`` then a rank-``r`` projection.

    A base that scales its output (Gemma's ``embed_scale``: ``y = c · W[ids]``) scales the adapter's part by the
    same ``c``, so merged equals unmerged. (DoRA here normalises each embedding *dimension*:
    :class:`deltatune.lora.dora.DoraEmbedding`.)
    """

    layer_kind = "embedding"

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise ConfigError("lora_bias=True is not supported for Embedding. (Set lora_bias=False or leave the "
                              "embedding out of target_modules.)")
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        b, a = self.lora_embedding_B[adapter_name], self.lora_embedding_A[adapter_name]
        return (b @ a).T * self.scaling[adapter_name]

    def _embed_scale(self) -> torch.Tensor | None:
        """The scalar the base embedding multiplies its output by (``embed_scale``, e.g. Gemma 3's
        ``TextScaledWordEmbedding``), or ``None``. A non-scalar ``embed_scale`` is not applied (PEFT's rule, with
        its warning)."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            w = self.base_layer.weight
            return torch.tensor(scale, device=w.device, dtype=w.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        if isinstance(scale, torch.Tensor):
            from deltatune.config import PeftWarning

            warnings.warn(f"Found embed_scale attribute with shape {tuple(scale.shape)}, expected scalar. Embedding "
                          "scaling will not be applied to the adapter's output", PeftWarning, stacklevel=3)
        return None

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(ids, table, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Per-row adapters: row ``i`` adds ``s_i · A_i^T[ids_i] B_i^T`` (``x: (batch, T)`` token ids)."""
        result = self.base_layer(x, *args, **kwargs)
        num, dim = self.base_layer.weight.shape
        stacks = self._stacks(x.shape[0], lambda n: self.lora_embedding_A[n], lambda n: self.lora_embedding_B[n],
                              num, dim, x.device)
        if stacks is None:
            return result
        present, index, rank, (a_all, b_all, _, scale_all) = stacks
        ids = x.reshape(x.shape[0], -1)
        h = a_all[:, :rank].transpose(1, 2)[index[:, None], ids]                    # (batch, T, rank)
        b_rows = b_all.index_select(0, index)                                       # (batch, dim, r_max)
        b_rows = b_rows[:, :, :rank] if rank < b_rows.shape[2] else b_rows          # see _gather_rows
        delta = torch.bmm(h, b_rows.transpose(1, 2))                                # (batch, T, dim)
        if (c := self._embed_scale()) is not None:
            delta = delta * c.to(delta.dtype)
        out = result.reshape(delta.shape)
        if any(n in self.lora_variant for n in present):  # y_i = c_i ⊙ (e W[ids_i] + e ΔW_i[ids_i])
            return (scale_all[index][:, None, :] * (out + delta)).reshape(result.shape).to(result.dtype)
        return result + delta.reshape(result.shape).to(result.dtype)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W[ids]`` then each active adapter's ``s · A^T[ids] B^T`` (times ``embed_scale``), added, or applied
        by its variant (``x: (...)`` token ids, returns ``(..., dim)``)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        embed_scale = self._embed_scale()
        for name in self._active_lora():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            delta = (self._embed(x, a.T) @ b.T) * self.scaling[name]                # (..., dim)
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            if (variant := self.lora_variant.get(name)) is not None:  # the input is ids: it gets the update
                result = variant.forward(self, name, delta, result)
            else:
                result = result + delta.to(result.dtype)
        return result.to(out_dtype)


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` is a conv with the base's kernel, stride, padding and dilation
    (``in -> r`` channels), ``B`` a 1x1 conv (``r -> out``), so ``ΔW[o, i, k] = s · Σ_r B[o, r] A[r, i, k]``.
    """

    layer_kind = "conv"

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.base_layer
        conv = type(base)
        if base.groups > 1:
            # B is a grouped 1x1 conv (r -> out in `groups` groups): r must split evenly, as in PEFT.
            if r % base.groups:
                raise ConfigError(
                    f"Targeting a {conv.__name__} with groups={base.groups} and rank {r}. Currently, support is "
                    "limited to conv layers where the rank is divisible by groups. Either choose a different rank "
                    "or do not target this specific layer."
                )
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.",
                          stacklevel=4)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                         dilation=base.dilation, bias=False)
        self.lora_B[adapter_name] = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=lora_bias)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise GroupedConvMergeError(
                "merging LoRA into a grouped convolution (groups > 1) is not supported: A mixes every input channel, "
                "which a grouped weight cannot hold; keep the adapter unmerged")
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        return delta * self.scaling[adapter_name]

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row ``i`` of the batch through its own adapter ``a``: ``y_i = W ⋆ x_i + b + s_a B_a(A_a(x_i))``
        (with a variant's row scale ``c_a``, DoRA's ``m_a/||W + ΔW_a||``: ``c_a ⊙ (W ⋆ x_i + s_a B_a(A_a(x_i))) + b``),
        ``x: (batch, C_in, *spatial)``.

        The base convolution runs once on the whole batch; each adapter's two small convolutions run once on its
        rows (one group per distinct name, as PEFT's), added back with ``index_add`` (out of place, so autograd
        still works). Rows named ``"__base__"`` or an adapter without factors here keep the base output.
        """
        result = self.base_layer(x, *args, **kwargs)
        names = self._row_names(x.shape[0])
        out_dtype = result.dtype
        for name in dict.fromkeys(names):
            if name not in self.r:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.index_select(0, rows).to(lora_a.weight.dtype))  # eval: identity
            delta = lora_b(lora_a(h)) * self.scaling[name]
            if (scale := self._row_scale(name)) is not None:
                base_out = result.index_select(0, rows)
                if self.bias is not None:
                    base_out = base_out - self.bias.view((1, -1) + (1,) * (result.dim() - 2))
                delta = (scale - 1) * base_out + scale * delta
            result = result.index_add(0, rows, delta.to(out_dtype))
        return result

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W ⋆ x + b`` then each active adapter's ``s · B(A(dropout(x)))``, or its variant's ``forward``
        (``x: (batch, C_in, *spatial)``)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._active_lora():
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = x.to(lora_a.weight.dtype)
            if (variant := self.lora_variant.get(name)) is not None:
                result = variant.forward(self, name, h, result)
            else:
                result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(out_dtype)


def make_lora_layer(target: nn.Module, fan_in_fan_out: bool) -> LoraLayer | None:
    """The LoRA wrapper class for ``target``'s type, or ``None`` if LoRA cannot adapt it."""
    conv1d = _conv1d_type()
    if isinstance(target, nn.Linear):
        return LoraLinear(target, fan_in_fan_out=False)
    if conv1d is not None and isinstance(target, conv1d):
        return LoraLinear(target, fan_in_fan_out=True)
    if isinstance(target, nn.Embedding):
        return LoraEmbedding(target)
    if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(target)
    return None


def supported_types() -> tuple[type, ...]:
    conv1d = _conv1d_type()
    base = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return base + ((conv1d,) if conv1d is not None else ())
