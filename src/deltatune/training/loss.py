"""Cross-entropy through the output projection, a chunk of rows at a time.

A causal LM's loss is ``sum_i CE(W h_i + b, t_i)`` over the labelled positions ``i``, with
``h: (N, H)``, ``W: (V, H)``. The plain way materialises the logits ``(N, V)``, their fp32 copy and,
in backward, their gradient ``(N, V)``: for SmolLM2 (``V = 49152``) and 8 x 256 tokens that is
400 MB each, more than the rest of a LoRA step. Here the rows go through in chunks of ``chunk_size``,
and since the loss is a sum, each chunk's gradient is finished in the forward pass:

    p_i = softmax(W h_i + b),     dL/dh_i = W^T (p_i - e_{t_i}),     dL/dW = sum_i (p_i - e_{t_i}) h_i^T

so at most ``(chunk_size, V)`` logits exist at a time, and backward only scales the stored
``dL/dh`` (and ``dL/dW``, ``dL/db`` when the head trains) by the incoming gradient. Rows labelled
``-100`` are dropped before the projection: they cost nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.training.data import IGNORE_INDEX

# Elements of one chunk's logits: 2**23 fp32 values are 32 MiB (170 rows of a 49152-token vocabulary).
CHUNK_ELEMENTS = 2 ** 23
# Config attributes of models that change the logits after the head (soft-capping, scaling): no chunked loss.
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling",
                    "lm_head_multiplier", "logit_softcapping")


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(W h_i + b, t_i)`` with every target valid; gradients are computed chunk by chunk in forward.

    Shapes: ``hidden: (N, H)``, ``weight: (V, H)``, ``bias: (V,) | None``, ``targets: (N,)``; returns a scalar.
    ``compute_dtype`` is the matmul dtype (the autocast dtype under autocast); softmax and the loss are fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int, compute_dtype: torch.dtype, needs: tuple[bool, bool, bool]) -> torch.Tensor:
        need_h, need_w, need_b = needs
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)               # (n, H)
                t = targets[start:start + chunk_size]                                # (n,)
                logits = F.linear(h, w, b).float()                                   # (n, V)
                lse = torch.logsumexp(logits, dim=-1)                                # (n,)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # logits becomes dL/dlogits = softmax - one_hot(t), in place: no second (n, V) tensor.
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.T.float(), h.float())                            # no-op casts in fp32
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction="sum")``
    without ever holding more than ``chunk_size`` rows of logits.

    Args:
        hidden: ``(..., H)`` hidden states (the head's input).
        weight: ``(V, H)`` output projection; ``bias``: ``(V,)`` or ``None``.
        targets: ``(...)`` token ids, ``-100`` where there is no loss.
        chunk_size: Rows per chunk; default ``CHUNK_ELEMENTS // V`` (at least 1).

    Returns:
        The summed loss, an fp32 scalar; gradients reach ``hidden``, ``weight`` and ``bias`` as the plain
        loss's would (matmuls in the autocast dtype under autocast, like ``F.linear`` there).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]} entries")
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    vocab = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // vocab)
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, compute_dtype, needs)


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The output projection of a causal LM if the chunked loss can replace it, else ``None``.

    It applies when the head is a plain ``nn.Linear`` (not an adapter layer, not quantized) whose output
    is the logits unchanged (no soft-capping or scaling after it in the model's config).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(inner, "config", None)
    for attr in _POST_HEAD_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return head


@contextlib.contextmanager
def head_returns_hidden(head: nn.Module) -> Iterator[None]:
    """While active, ``head(x)`` returns ``x``: the model's ``logits`` output holds the head's input."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
