"""LoRA layers: the low-rank update ``ΔW = s · B A`` beside a frozen layer, plus DoRA.

Shapes: ``A: (r, in)``, ``B: (out, r)``, ``x: (..., in)``; the scaling ``s`` is ``alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Computing ``B (A x)`` keeps every intermediate ``(..., r)``:
the dense ``ΔW`` is only formed to merge or for DoRA's weight norm.

DoRA (Liu et al., 2024) rescales each output row of the adapted weight to a trained magnitude ``m``::

    y = m / ||W + s B A||_row · (W + s B A) x + b

with the norm detached (the paper's section 4.3), which PEFT computes as
``(m/n - 1) · W x + (m/n) · s · B A x`` on top of the base output ``W x + b``.
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
from deltatune.lora.alora import MERGE_REFUSAL, alora_forward
from deltatune.quantization import dequantize_weight

PISSA_NITER_SEED = 0  # the seed of pissa_niter_N's randomised SVD (see LoraLinear._initial_factors)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:
        return None


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude ``m``: one value per output row (channel) of the base weight.

    Its parameter is called ``weight`` so the state-dict key is ``lora_magnitude_vector.<adapter>.weight``,
    saved to files as ``lora_magnitude_vector`` like PEFT does.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


_MARGIN_SIGMAS = 6.0  # extra draws, in standard deviations of the drop count: a second round about once in 10^9


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat positions ``(K,)`` (int64) of the entries a Bernoulli(p) dropout drops among ``n``, on CPU.

    The mask is drawn by where it drops rather than entry by entry: the gaps between dropped positions of a
    Bernoulli(p) sequence are geometric, ``G = 1 + floor(log(1 - U) / log(1 - p))`` with ``U`` uniform, so one
    float draw per *dropped* entry (``p · n`` of them, plus a margin) and a cumulative sum place them all, with
    ``p`` exact. At ``p = 0.05`` that is 1/20 of the random numbers a per-entry draw needs; torch's CPU generator
    is sequential, and the draw had been the largest cost of LoRA dropout. Reproducible under
    ``torch.manual_seed``. ``0 < p < 1``.
    """
    log_keep, mean = math.log1p(-p), n * p
    parts, start = [], 0  # start: first position not yet covered by a gap
    while start < n:
        draws = max(16, int(mean * (n - start) / n + _MARGIN_SIGMAS * math.sqrt(mean)))
        u = torch.rand(draws)                                               # [0, 1): 1 - u in (0, 1]
        gaps = torch.log1p(u.neg_()).div_(log_keep).to(torch.int64).add_(1)  # >= 1, geometric(p)
        pos = gaps.cumsum_(0).add_(start - 1)                               # increasing
        inside = int(torch.searchsorted(pos, n))
        parts.append(pos[:inside])
        start = n if inside < draws else int(pos[-1]) + 1
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)  # n = 0: an empty batch


def draw_dropout(shape: torch.Size | tuple[int, ...], p: float, device: torch.device
                 ) -> tuple[torch.Tensor, float]:
    """A dropout draw over ``shape`` in the form a layer keeps for backward, and the keep probability ``q``.

    On CPU the dropped positions (:func:`dropped_positions`; int32 where they fit: 4 bytes per *dropped* entry,
    0.2 bytes per entry at ``p = 0.05`` against 1 for a bool mask), elsewhere a bool keep-mask (``rand >= p``:
    GPU generators are parallel, and finding positions would need a host sync). ``0 < p``.
    """
    if p >= 1:
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 - p
    n = math.prod(shape)
    pos = dropped_positions(n, p)
    return (pos.to(torch.int32) if n < 2**31 else pos), 1.0 - p


def keep_values(mask: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``k: (shape)`` in ``dtype``, 1 where kept and 0 where dropped, from a :func:`draw_dropout` result.

    Built in the compute dtype directly: every op that multiplies by a bool tensor first converts it (a copy)."""
    if mask.dtype == torch.bool:
        return mask.to(dtype)
    keep = torch.ones(shape, dtype=dtype)
    keep.view(-1).index_fill_(0, mask.long(), 0)
    return keep


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep-mask ``(shape)`` of ``bool`` (each entry dropped with probability ``p``, independently)
    and its keep probability ``q = 1 - p``: the same draw as :func:`draw_dropout` for the same seed."""
    if p <= 0:
        return torch.ones(shape, dtype=torch.bool, device=device), 1.0
    mask, q = draw_dropout(shape, p, device)
    return keep_values(mask, shape, torch.bool), q


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor in ``dtype`` (``None`` stays ``None``): a node's operands under autocast, cast once."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class _LoraLinearNode(torch.autograd.Function):
    """One LoRA linear layer, base included, as one autograd node: ``y = W x + b + s · B A (k ⊙ x) / q``.

    ``k`` is a dropout keep-mask with keep probability ``q`` (:func:`draw_dropout`; ``k = 1, q = 1`` without
    dropout). The base output is written once and the low-rank update is added into it in place
    (``addmm_``), so no ``(..., out)`` tensor is copied; backward adds ``(g B) A`` into ``g W`` the same way.
    Saved for backward: the layer input ``x`` (shared with the base layer), ``h = A (k ⊙ x) / q: (N, r)`` and
    the dropout draw (:func:`draw_dropout`: the dropped positions on CPU, ~0.2 bytes per entry at ``p = 0.05``);
    the dropped input ``k ⊙ x`` is rebuilt in backward rather than stored.

    Shapes: ``x: (..., in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``, ``b, b_B: (out,) | None``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, b_bias: torch.Tensor | None, scaling: float, p: float,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        if compute_dtype is not None:
            # Under autocast: every operand cast once, as autocast casts a linear layer's (the input once for
            # the base and the adapter, where the composed path casts it twice); backward runs in that dtype
            # and autograd casts each gradient back to its input's dtype.
            with torch.autocast(x.device.type, enabled=False):
                x, weight, bias, a, b, b_bias = _cast(compute_dtype, x, weight, bias, a, b, b_bias)
                return _LoraLinearNode.forward(ctx, x, weight, bias, a, b, b_bias, scaling, p)
        x2 = x.reshape(-1, x.shape[-1])                                 # (N, in)
        xa = x2.to(a.dtype)  # the adapter's input in its own dtype (fp32 adapters over a bf16 base, as PEFT)
        if p > 0:
            mask, q = draw_dropout(x2.shape, p, x.device)
            dropped_x = keep_values(mask, x2.shape, a.dtype).mul_(xa)    # k ⊙ x, freed after the product
            h = torch.matmul(dropped_x, a.T).mul_(1.0 / q) if q > 0 else xa.new_zeros(x2.shape[0], a.shape[0])
            del dropped_x
        else:
            mask, q = None, 1.0
            h = torch.matmul(xa, a.T)                                   # (N, r)
        del xa
        y = F.linear(x2, weight, bias)                                  # (N, out)
        if y.dtype == h.dtype:
            y.addmm_(h, b.T, alpha=scaling)
        else:  # the update in the adapter's dtype, added with one rounding to the base's
            y.add_(torch.matmul(h, b.T), alpha=scaling)
        if b_bias is not None:
            y.add_(b_bias, alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, h, mask)
        ctx.scaling, ctx.inv_q = scaling, (1.0 / q if q > 0 else 0.0)
        ctx.has_bias, ctx.has_b_bias, ctx.lead = bias is not None, b_bias is not None, x.shape[:-1]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, a, b, h, mask = ctx.saved_tensors
        s, need = ctx.scaling, ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])                   # (N, out)
        ga = g.to(a.dtype)                                              # for the adapter's products
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_b_bias = None
        if need[4]:
            grad_b = torch.matmul(ga.T, h).mul_(s)                      # (out, r)
        if ctx.has_b_bias and need[5]:
            grad_b_bias = ga.sum(0).mul_(s)
        if ctx.has_bias and need[2]:
            grad_bias = g.sum(0)
        if need[1]:
            grad_w = torch.matmul(g.T, x2)
        if need[0] or need[3]:
            g_h = torch.matmul(ga, b).mul_(s * ctx.inv_q)               # (N, r): dL/d(A k⊙x)
            kf = None if mask is None else keep_values(mask, x2.shape, a.dtype)
            scratch = None  # an (N, in) tensor of this node's own, free once A's gradient is taken
            if need[3]:
                xa = x2.to(a.dtype)                                     # x2 itself when the dtypes agree
                dropped_x = xa if kf is None else xa * kf               # k ⊙ x, rebuilt: (N, in)
                grad_a = torch.matmul(g_h.T, dropped_x)
                scratch = None if dropped_x is x2 else dropped_x
            if need[0]:
                grad_x = torch.matmul(g, weight)                        # (N, in)
                if kf is None and grad_x.dtype == g_h.dtype:
                    grad_x.addmm_(g_h, a)
                else:  # += (g_h A) ⊙ k, written over the scratch tensor when there is one
                    update = torch.matmul(g_h, a) if scratch is None else torch.matmul(g_h, a, out=scratch)
                    if kf is None:
                        grad_x.add_(update)
                    else:
                        grad_x.addcmul_(update, kf)
                grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1])
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_b_bias, None, None, None


class _LoraDropoutBranch(torch.autograd.Function):
    """``s · B A (k ⊙ x) / q`` with a keep-mask ``k`` (:func:`draw_dropout`), saving ``x`` and the draw only.

    The branch alone, for layers that cannot take :class:`_LoraLinearNode` (a quantized or hooked base,
    several active adapters). ``nn.Dropout`` followed by ``A`` saves the dropped copy of ``x`` (4 bytes per
    element, one per adapted layer, even where q/k/v share the same ``x``); here the dropped input is rebuilt in
    backward.

    Shapes: ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``, ``b: (out,) | None``; returns ``(..., out)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, b_bias: torch.Tensor | None,
                p: float, scaling: float) -> torch.Tensor:
        mask, q = draw_dropout(x.shape, p, x.device)
        inv_q = 1.0 / q if q > 0 else 0.0
        h = torch.matmul(keep_values(mask, x.shape, x.dtype).mul_(x), a.T).mul_(inv_q)  # (..., r)
        out = F.linear(h, b, b_bias).mul_(scaling)
        ctx.save_for_backward(x, mask, a, b, h)
        ctx.inv_q, ctx.scaling, ctx.has_bias = inv_q, scaling, b_bias is not None
        # Under autocast the forward's matmuls ran in its dtype; backward (which autocast does not reach on its
        # own) runs under the same autocast, and autograd casts each gradient to its input's dtype.
        device = x.device.type
        ctx.amp = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.amp is None:
            return _LoraDropoutBranch._backward(ctx, grad_out)
        with torch.autocast(ctx.amp[0], dtype=ctx.amp[1]):
            return _LoraDropoutBranch._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        x, mask, a, b, h = ctx.saved_tensors
        s, inv_keep = ctx.scaling, ctx.inv_q
        keep = keep_values(mask, x.shape, x.dtype)
        g = grad_out * s                                   # (..., out)
        g_h = torch.matmul(g, b)                           # (..., r)
        grad_b = grad_bias = grad_a = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.matmul(g.reshape(-1, g.shape[-1]).T, h.reshape(-1, h.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0)
        g_h = g_h.mul_(inv_keep)
        if ctx.needs_input_grad[1]:
            xd = (x * keep).reshape(-1, x.shape[-1])
            grad_a = torch.matmul(g_h.reshape(-1, g_h.shape[-1]).T, xd)
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(g_h, a).mul_(keep)
        return grad_x, grad_a, grad_b, grad_bias, None, None


class _DoraLinear(torch.autograd.Function):
    """The whole DoRA linear layer in one autograd node (no dropout on its input).

    ``z = W x + s · B (A x)``, ``y = (m / n) ⊙ z + b`` with ``n = ||W + s B A||_row`` detached. PEFT's
    composition of ``(m/n - 1) ⊙ W x + (m/n) ⊙ s B A x`` on top of the base output keeps two ``(..., out)``
    tensors per layer for backward. Here ``z`` is rescaled into the output (in place without a bias; with one,
    through a transient ``z - b``, so that ``m = n`` returns the base layer's output bit for bit) and the node keeps the
    output itself (which the next layer usually keeps too: SiLU, the gate product), plus the shared ``x`` and
    ``A x``. The magnitude's gradient needs ``z`` only through ``Σ g ⊙ z / n``, which is
    ``Σ g ⊙ (y - b) / m``; where some ``m`` is exactly 0 that quotient is undefined, so such a layer keeps ``z``
    (checked on CPU only: on an accelerator the check would stall the stream, so ``z`` is always kept there).

    Shapes: ``x: (..., in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``, ``m, n, b: (out,)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        if compute_dtype is not None:
            # Under autocast: the products in its dtype (operands cast once); the row scale m/n stays fp32 and
            # is applied in fp32 before the output is rounded (in bf16, 1 + δ moves in steps of 2^-7, which
            # would hide a trained magnitude's small changes).
            with torch.autocast(x.device.type, enabled=False):
                x, weight, bias, a, b = _cast(compute_dtype, x, weight, bias, a, b)
                return _DoraLinear.forward(ctx, x, weight, bias, a, b, magnitude, norm, scaling)
        h = torch.matmul(x, a.T)                                   # (..., r)
        # With a bias, z_b = W x + b is the base layer's own output (one addmm, as nn.Linear rounds it), and
        # y = z_b + (m/n - 1) ⊙ (z_b - b): where m = n (DoRA at init) that is the base output bit for bit.
        z = F.linear(x, weight, bias)                              # (..., out)
        z.view(-1, z.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T, alpha=scaling)
        scale = magnitude / norm                                   # (out,)
        ctx.keeps_z = magnitude.device.type != "cpu" or bool((magnitude == 0).any())
        if bias is None:
            y = torch.mul(z, scale, out=torch.empty_like(z)) if ctx.keeps_z else z.mul_(scale)
        else:
            z_nob = z - bias                                       # W x + s B A x
            y = torch.addcmul(z, z_nob, scale - 1, out=torch.empty_like(z) if ctx.keeps_z else z_nob)  # one pass
            z = z_nob if ctx.keeps_z else None
        if ctx.keeps_z:
            ctx.save_for_backward(x, weight, a, b, h, z, scale, norm, None)
        else:
            ctx.save_for_backward(x, weight, a, b, h, y, scale, magnitude, bias)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, a, b, h, zy, scale, divisor, bias = ctx.saved_tensors
        s = ctx.scaling
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        g_sum = flat(grad_out).sum(0, dtype=torch.float32) if ctx.has_bias else None
        if ctx.needs_input_grad[5]:
            dot = (flat(grad_out) * flat(zy)).sum(0, dtype=torch.float32)  # Σ g ⊙ z, or Σ g ⊙ y
            if not ctx.keeps_z and bias is not None:
                dot = dot - bias * g_sum                           # Σ g ⊙ (y - b)
            grad_m = dot / divisor                                 # / n, or / m
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g_sum
        g_z = torch.mul(grad_out, scale, out=torch.empty_like(grad_out, memory_format=torch.contiguous_format))
        g_h = torch.matmul(g_z, b).mul_(s)                         # (..., r)
        if ctx.needs_input_grad[4]:
            grad_b = torch.matmul(flat(g_z).T, flat(h)).mul_(s)
        if ctx.needs_input_grad[3]:
            grad_a = torch.matmul(flat(g_h).T, flat(x))
        if ctx.needs_input_grad[1]:
            grad_w = torch.matmul(flat(g_z).T, flat(x))
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(g_z, weight)
            grad_x.view(-1, grad_x.shape[-1]).addmm_(flat(g_h), a)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device, or ``None``."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of ``weight: (out, ...)`` -> ``(out,)``."""
    return weight.flatten(1).norm(p=2, dim=1)


BASE_ROW = "__base__"


class _SlotTable:
    """Preallocated adapter slots of one LoRA layer for mixed-adapter batches (as Punica and S-LoRA keep them).

    ``a: (cap, r_max, in)``, ``b: (cap, out, r_max)`` (the scaling folded in), ``bias: (cap, out)`` and the DoRA
    row ``scale: (cap, out)`` (ones where not DoRA). Slot 0 is the base model (zeros, scale 1) and is never given
    out; ranks are zero-padded to ``r_max``, which leaves every product exact. An adapter keeps its slot across
    calls, so a decoding step gathers rows by slot index instead of stacking every adapter again.

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


class LoraLayer(AdapterLayer):
    """Shared LoRA bookkeeping; :class:`LoraLinear`, :class:`LoraEmbedding`, :class:`LoraConv` add the math."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias", "use_alora",
                         "use_rslora")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}  # to recompute the initial scaling (set_scale, unscale_layer)
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_norms: dict[str, torch.Tensor] = {}  # weight norms at merge time, to unmerge exactly
        self.row_adapters: list[str] | None = None  # set by PeftModel for mixed-adapter batches
        # aLoRA adapters (True only) and, during a PeftModel call, their offsets (deltatune.lora.alora)
        self.use_alora: dict[str, bool] = {}
        self.alora_offsets: dict | None = None
        # The adapter slots of mixed-adapter batches (see _SlotTable); allocated at the first such batch.
        self._slots: _SlotTable | None = None

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, use_alora: bool = False) -> None:
        """Create adapter ``adapter_name`` with rank ``r`` and initialise it (``use_alora``: an aLoRA adapter, which
        acts only from its invocation tokens on; Linear layers only, see :mod:`deltatune.lora.alora`)."""
        if r <= 0:
            raise ConfigError(f"rank must be positive, got r={r}")
        if use_dora and lora_bias:
            raise ConfigError("DoRA with lora_bias=True is not supported; drop one of them")
        self._release_slot(adapter_name)  # a re-created adapter refills its slot; the other slots stay valid
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias
        if use_alora:
            self.use_alora[adapter_name] = True
        else:
            self.use_alora.pop(adapter_name, None)
        self._create_adapter(adapter_name, r, lora_bias)  # refuses lora_bias where it cannot train (Embedding)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # PEFT's warning (and category): the adapter trains, but cannot be merged
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} has no "
                "bias. This means that merging LoRA weights won't be possible.", PeftWarning, stacklevel=4)
        self._place_adapter(adapter_name)
        self._init_weights(adapter_name, init_lora_weights)
        if use_dora:
            self._init_dora(adapter_name)
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

    def _init_dora(self, adapter_name: str) -> None:
        raise ConfigError(f"DoRA is supported on Linear and Conv layers, not on {type(self.base_layer).__name__}")

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
        """LoRA is LoRA; DoRA and aLoRA adapters too, as PEFT says (their merged update is still a weight change)."""
        return True

    # ---- mixed-adapter batches -----------------------------------------------------------------
    def _row_index(self, batch: int) -> tuple[list[str], list[str]]:
        """Each row's adapter name (``"__base__"`` or an adapter this layer lacks: the base) and the adapters
        present in this batch, sorted."""
        names = self._row_names(batch)
        return names, sorted({n for n in names if n in self.r})

    def _stack_inputs(self, present: list[str], a_of, b_of) -> list[torch.Tensor]:
        """Every tensor the stacks are computed from: each adapter's A, B, bias and DoRA magnitude, and the base
        weight where DoRA's row scale reads it."""
        tensors: list[torch.Tensor] = []
        for n in present:
            tensors += [a_of(n), b_of(n)]
            if self.lora_bias.get(n):
                tensors.append(self.lora_B[n].bias)
            if self.use_dora.get(n):
                tensors += [self.lora_magnitude_vector[n].weight, self.base_layer.weight]
        return tensors

    def _stacks(self, batch: int, a_of, b_of, in_dim: int, out_dim: int, device: torch.device):
        """The per-row weights of a mixed batch of ``batch`` rows, or ``None`` when no row has an adapter here.

        Returns ``(present, index, rank, (a, b, bias, scale))``: ``a: (k, r, in)``, ``b: (k, out, r)`` (scaling
        folded in), ``bias: (k, out)`` and the DoRA row scale ``(k, out)``, and ``index: (batch,)`` the row of
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
            values = (self.r[n], self.scaling[n], bool(self.lora_bias.get(n)), bool(self.use_dora.get(n)))
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
            if self.use_dora.get(name):
                table.scale[i] = self._dora_scale(name).flatten()
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
            scale.append(self._dora_scale(n).flatten().to(dtype) if self.use_dora.get(n) else scale[0])
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
        self._dora_norms.pop(adapter_name, None)

    def _take_out(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight`` with the merged adapter ``adapter_name`` taken out, out of place (LoRA: ``- ΔW``)."""
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        new = self._take_out(weight, adapter_name)
        self._dora_norms.pop(adapter_name, None)  # the merge is undone: its norm is no longer needed
        return new

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight (storage layout) as ``forward`` sees it: with every merged adapter taken out, last merged
        first. DoRA's merge needs it, since after a first merge the base weight holds that adapter too."""
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

    def _init_dora(self, adapter_name: str) -> None:
        with torch.no_grad():
            w = self._base_weight().float() + self.scaling[adapter_name] * self._lora_weight(adapter_name).float()
            magnitude = _row_norm(w).to(self.lora_A[adapter_name].weight.dtype)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    # ---- DoRA --------------------------------------------------------------------------------
    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ||W + s B A||_row`` with the norm detached: ``(out,)``."""
        with torch.no_grad():
            w = self._base_weight()
            lora_w = self._lora_weight(adapter_name).to(w.dtype)
            norm = _row_norm(w + self.scaling[adapter_name] * lora_w)
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return magnitude / norm.to(magnitude.dtype)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.use_alora.get(adapter_name):
            raise MergeError(f"adapter {adapter_name!r} cannot be merged: {MERGE_REFUSAL}; keep it unmerged")
        self._check_bias_mergeable(adapter_name)  # before merge() writes the weight
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight + delta
        # DoRA's norm is the one forward uses, ||W + s B A|| of the base *without* the adapters merged before
        # this one (PEFT's rule); the row scale then applies to the current weight, which holds them, exactly as
        # forward rescales the running output (base + earlier adapters) by m / n.
        unmerged = self._unmerged_base_weight().to(weight.dtype) + delta
        norm = _row_norm(unmerged.T if self.fan_in_fan_out else unmerged)
        self._dora_norms[adapter_name] = norm
        scale = self.lora_magnitude_vector[adapter_name].weight.to(weight.dtype) / norm
        return (weight + delta) * (scale[None, :] if self.fan_in_fan_out else scale[:, None])

    def _take_out(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight`` with merged adapter ``adapter_name`` taken out (out of place; its merge norm is kept)."""
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight - delta
        scale = self.lora_magnitude_vector[adapter_name].weight.to(weight.dtype) / self._dora_norms[adapter_name]
        return weight / (scale[None, :] if self.fan_in_fan_out else scale[:, None]) - delta

    # ---- forward -----------------------------------------------------------------------------
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

    def _fused_lora_p(self, x: torch.Tensor) -> float | None:
        """The dropout probability for :class:`_LoraLinearNode` (0 without dropout), or ``None`` when one
        plain LoRA adapter over a plain dense base is not what this layer runs."""
        active = self._active_lora()
        if len(active) != 1 or self.use_dora[active[0]] or not self._plain_dense_base(
                x, active[0], autocast_ok=True, adapter_dtype_ok=True):
            return None
        dropout = self.lora_dropout[active[0]]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    def _dora_fast_path(self, x: torch.Tensor) -> bool:
        """One DoRA adapter, no active dropout, plain dense base: the single-node DoRA applies."""
        active = self._active_lora()
        if len(active) != 1 or not self.use_dora[active[0]]:
            return False
        dropout = self.lora_dropout[active[0]]
        return ((isinstance(dropout, nn.Identity) or not self.training)
                and self._plain_dense_base(x, active[0], autocast_ok=True))

    @torch.no_grad()
    def _dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """``||W + s B A||_row: (out,)`` without forming the ``(out, in)`` matrix ``W + s B A``.

        Expanding the square row by row,

            ||W + s B A||² = ||W||² + 2 s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B),

        costs two reads of ``W`` (a norm, a ``(out, in) x (in, r)`` matmul) and ``(out, r)`` tensors, once per
        forward, instead of writing and reading three ``(out, in)`` temporaries. (Not cached across steps: a
        cache of ``||W||²`` would have to notice every way the base weight can be replaced.)
        """
        w = self._base_weight()                                                     # (out, in)
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        s = self.scaling[adapter_name]
        with torch.autocast(w.device.type, enabled=False):  # in the weights' precision, also under autocast
            weight_sq = torch.linalg.vector_norm(w, dim=1).square_()               # (out,)
            cross = (torch.matmul(w, a.T) * b).sum(1)                              # (out,)
            lora_sq = (torch.matmul(b, torch.matmul(a, a.T)) * b).sum(1)          # (out,)
        norm_sq = weight_sq + (2 * s) * cross + (s * s) * lora_sq
        return norm_sq.clamp_min_(0).sqrt_()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (bypass := self._bypass(x, *args, **kwargs)) is not None:
            return bypass
        if self.use_alora and not self.merged and (alora := [n for n in self.active_adapters if n in self.use_alora]):
            return alora_forward(self, x, alora, *args, **kwargs)  # adapted from the invocation tokens on only
        if not self.merged and (p := self._fused_lora_p(x)) is not None:
            name = self._active_lora()[0]
            b = self.lora_B[name]
            return _LoraLinearNode.apply(x, self._base_weight(), self.base_layer.bias, self.lora_A[name].weight,
                                         b.weight, b.bias, self.scaling[name], p, _autocast_dtype(x))
        if not self.merged and self._dora_fast_path(x):
            name = self._active_lora()[0]
            norm = self._dora_weight_norm(name)
            return _DoraLinear.apply(x, self._base_weight(), self.base_layer.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.lora_magnitude_vector[name].weight, norm,
                                     self.scaling[name], _autocast_dtype(x))
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self._active_lora():
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout, s = self.lora_dropout[name], self.scaling[name]
            # the adapter's own dtype, unless disable_input_dtype_casting asked to leave x alone (hooks cast)
            h = x.to(lora_a.weight.dtype) if self.cast_input_dtype_enabled else x
            if not self.use_dora[name]:
                if self.training and isinstance(dropout, nn.Dropout) and torch.is_grad_enabled():
                    branch = _LoraDropoutBranch.apply(h, lora_a.weight, lora_b.weight, lora_b.bias, dropout.p, s)
                    result = result + branch
                else:
                    result = result + lora_b(lora_a(dropout(h))) * s
                continue
            # DoRA: rescale (W x + s B A x) row-wise; the base part is reused unless dropout changed x.
            if isinstance(dropout, nn.Identity) or not self.training:
                base_out = result if self.bias is None else result - self.bias
            else:
                h = dropout(h)
                base_out = F.linear(h, self._base_weight().to(h.dtype))
            scale = self._dora_scale(name)
            result = result + (scale - 1) * base_out + scale * lora_b(lora_a(h)) * s
        return result.to(out_dtype)


    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row ``i`` of the batch through its own adapter, in two batched matmuls.

        ``y_i = m_i ⊙ (W x_i + s_i B_i A_i x_i) + b + s_i b_i`` with ``x: (batch, ..., in)``; ``A_i, B_i`` are
        gathered per row from the zero-padded stacks, so there is no Python loop over adapters.
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
        if any(self.use_dora.get(n) for n in present):
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

    DoRA (as PEFT defines it for embeddings) normalises each embedding *dimension* (a column of ``W``, over the
    whole vocabulary), so the magnitude ``m`` is ``(dim,)``::

        y = m / ||W + ΔW||_col · (W + ΔW)[ids],   ΔW = s · (B A)^T: (num, dim),   ||·||_col: (dim,)

    with the norm detached. A base that scales its output (Gemma's ``embed_scale``: ``y = c · W[ids]``) scales the
    adapter's part by the same ``c``, so merged equals unmerged.
    """

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

    def _init_dora(self, adapter_name: str) -> None:
        """``m = ||W + ΔW||_col: (dim,)``, so the new adapter starts as the identity."""
        with torch.no_grad():
            w = self.base_layer.weight.float() + self.get_delta_weight(adapter_name).float()   # (num, dim)
            magnitude = w.norm(p=2, dim=0).to(self.lora_embedding_A[adapter_name].dtype)       # (dim,)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ||W + ΔW||_col`` with the norm detached: ``(dim,)`` (computed in the wider of the base's and the
        adapter's dtypes, as PEFT does)."""
        with torch.no_grad():
            norm = (self.base_layer.weight + self.get_delta_weight(adapter_name)).norm(p=2, dim=0)
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return magnitude / norm.to(magnitude.dtype)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight + delta
        # the norm forward uses: of the base without the adapters merged before this one (see LoraLinear)
        norm = (self._unmerged_base_weight().to(weight.dtype) + delta).norm(p=2, dim=0)
        self._dora_norms[adapter_name] = norm
        scale = self.lora_magnitude_vector[adapter_name].weight.to(weight.dtype) / norm
        return (weight + delta) * scale[None, :]

    def _take_out(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight - delta
        scale = self.lora_magnitude_vector[adapter_name].weight.to(weight.dtype) / self._dora_norms[adapter_name]
        return weight / scale[None, :] - delta

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
        if any(self.use_dora.get(n) for n in present):  # y_i = (m_i / n_i) ⊙ (c W[ids_i] + c ΔW_i[ids_i])
            return (scale_all[index][:, None, :] * (out + delta)).reshape(result.shape).to(result.dtype)
        return result + delta.reshape(result.shape).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (bypass := self._bypass(x, *args, **kwargs)) is not None:
            return bypass
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        embed_scale = self._embed_scale()
        for name in self._active_lora():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            delta = (self._embed(x, a.T) @ b.T) * self.scaling[name]                # (..., dim)
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            if self.use_dora[name]:  # rescale the running output (base + earlier adapters), as PEFT does
                scale = self._dora_scale(name)
                result = scale * result + scale * delta
            else:
                result = result + delta.to(result.dtype)
        return result.to(out_dtype)


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` is a conv with the base's kernel, stride, padding and dilation
    (``in -> r`` channels), ``B`` a 1x1 conv (``r -> out``), so ``ΔW[o, i, k] = s · Σ_r B[o, r] A[r, i, k]``.
    """

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

    def _dora_delta(self, adapter_name: str) -> torch.Tensor:
        """The ``ΔW: (out, in/groups, *kernel)`` whose ``||W + ΔW||_row`` DoRA divides by.

        With ``groups == 1`` it is the update itself (:meth:`get_delta_weight`). A grouped base has no such update
        (``A`` reads every input channel), so the norm takes PEFT's definition, which files trained there rely on:
        ``s · B A`` with ``B: (out, r/groups)`` read row-major as ``(out/groups, r)``, ``A`` as ``(r, in·k)``, and
        the ``(out/groups, in·k)`` product laid out as ``W``'s shape.
        """
        if self.base_layer.groups == 1:
            return self.get_delta_weight(adapter_name)
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        r = a.shape[0]
        product = b.reshape(-1, r) @ a.reshape(r, -1)                               # (out/groups, in·k)
        return product.reshape(self.base_layer.weight.shape) * self.scaling[adapter_name]

    def _init_dora(self, adapter_name: str) -> None:
        with torch.no_grad():
            w = self.base_layer.weight.float()
            norm = _row_norm(w + self._dora_delta(adapter_name).float())
        # PEFT keeps the conv magnitude shaped (1, out, 1, ...); the same shape keeps files compatible.
        shape = (1, -1) + (1,) * (w.dim() - 2)
        magnitude = norm.view(shape).to(self.lora_A[adapter_name].weight.dtype)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            w = self.base_layer.weight
            norm = _row_norm(w + self._dora_delta(adapter_name).to(w.dtype))
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return magnitude / norm.view(magnitude.shape).to(magnitude.dtype)  # (1, out, 1, ...)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        self._check_bias_mergeable(adapter_name)  # before merge() writes the weight
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight + delta
        norm = _row_norm(self._unmerged_base_weight().to(weight.dtype) + delta)  # as forward: see LoraLinear
        self._dora_norms[adapter_name] = norm
        scale = self.lora_magnitude_vector[adapter_name].weight.flatten().to(weight.dtype) / norm
        return (weight + delta) * scale.view(-1, *([1] * (weight.dim() - 1)))

    def _take_out(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora[adapter_name]:
            return weight - delta
        magnitude = self.lora_magnitude_vector[adapter_name].weight.flatten().to(weight.dtype)
        scale = magnitude / self._dora_norms[adapter_name]
        return weight / scale.view(-1, *([1] * (weight.dim() - 1))) - delta

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row ``i`` of the batch through its own adapter ``a``: ``y_i = W ⋆ x_i + b + s_a B_a(A_a(x_i))``
        (DoRA: ``m_a/||W + ΔW_a|| ⊙ (W ⋆ x_i + s_a B_a(A_a(x_i))) + b``), ``x: (batch, C_in, *spatial)``.

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
            if self.use_dora[name]:
                base_out = result.index_select(0, rows)
                if self.bias is not None:
                    base_out = base_out - self.bias.view((1, -1) + (1,) * (result.dim() - 2))
                scale = self._dora_scale(name)
                delta = (scale - 1) * base_out + scale * delta
            result = result.index_add(0, rows, delta.to(out_dtype))
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (bypass := self._bypass(x, *args, **kwargs)) is not None:
            return bypass
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self._active_lora():
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout, s = self.lora_dropout[name], self.scaling[name]
            h = x.to(lora_a.weight.dtype)
            if not self.use_dora[name]:
                result = result + lora_b(lora_a(dropout(h))) * s
                continue
            bias_shape = (1, -1) + (1,) * (result.dim() - 2)
            if isinstance(dropout, nn.Identity) or not self.training:
                base_out = result if self.bias is None else result - self.bias.view(bias_shape)
            else:
                h = dropout(h)
                base = self.base_layer
                base_out = base._conv_forward(h, base.weight, None)
            scale = self._dora_scale(name)
            result = result + (scale - 1) * base_out + scale * lora_b(lora_a(h)) * s
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
