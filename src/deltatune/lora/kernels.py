"""LoRA's kernels: dropout sampling and the single-node autograd Functions, pure functions of tensors.

Shapes as in :mod:`deltatune.lora.layer`: ``x: (..., in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``,
``s`` the scaling. Nothing here knows about layers or adapters: the layers (and variants such as DoRA,
:mod:`deltatune.lora.dora`) decide when a kernel applies and pass it tensors.

- :func:`draw_dropout` / :func:`keep_values` / :func:`keep_mask`: a Bernoulli dropout draw kept as dropped
  positions (CPU) or a bool mask, rebuilt in backward instead of stored.
- :class:`LoraLinearNode`: ``y = W x + b + s · B A (k ⊙ x) / q`` as one autograd node.
- :class:`LoraDropoutBranch`: the branch ``s · B A (k ⊙ x) / q`` alone.
- :class:`DoraLinearNode`: ``y = (m / n) ⊙ (W x + s · B A x) + b`` as one autograd node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


class LoraLinearNode(torch.autograd.Function):
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
                return LoraLinearNode.forward(ctx, x, weight, bias, a, b, b_bias, scaling, p)
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


class LoraDropoutBranch(torch.autograd.Function):
    """``s · B A (k ⊙ x) / q`` with a keep-mask ``k`` (:func:`draw_dropout`), saving ``x`` and the draw only.

    The branch alone, for layers that cannot take :class:`LoraLinearNode` (a quantized or hooked base,
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
            return LoraDropoutBranch._backward(ctx, grad_out)
        with torch.autocast(ctx.amp[0], dtype=ctx.amp[1]):
            return LoraDropoutBranch._backward(ctx, grad_out)

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


class DoraLinearNode(torch.autograd.Function):
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
                return DoraLinearNode.forward(ctx, x, weight, bias, a, b, magnitude, norm, scaling)
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


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device, or ``None``."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of ``weight: (out, ...)`` -> ``(out,)``."""
    return weight.flatten(1).norm(p=2, dim=1)
