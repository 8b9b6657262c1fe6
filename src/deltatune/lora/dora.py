"""DoRA (Liu et al., 2024) as a LoRA variant: a trained magnitude per output row of the adapted weight.

Each output row (channel) of ``W + s B A`` is rescaled to a trained magnitude ``m``::

    y = m / ||W + s B A||_row · (W + s B A) x + b

with the norm ``n = ||W + s B A||_row`` detached (the paper's section 4.3). On top of the base output
``W x + b`` that is ``(m/n - 1) · W x + (m/n) · s · B A x``, PEFT's composition, which the composed path runs; one
plain dense Linear adapter without dropout runs as one autograd node instead (:class:`DoraLinearNode`).
At creation ``m = n``, so a new adapter leaves the layer's output unchanged (bit for bit on the fused path).

Embeddings normalise each embedding *dimension* (a column of ``W: (num, dim)``, over the whole vocabulary), so
there ``m: (dim,)``; convolutions normalise each output channel and keep ``m`` shaped ``(1, out, 1, ...)`` as PEFT
does. Merging keeps the norm it divided by, so that unmerging restores ``W`` exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.lora.kernels import DoraLinearNode, autocast_dtype, row_norm
from deltatune.lora.variants import LoraVariant


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude ``m``: one value per output row (channel) of the base weight.

    Its parameter is called ``weight`` so the state-dict key is ``lora_magnitude_vector.<adapter>.weight``,
    saved to files as ``lora_magnitude_vector`` like PEFT does.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class Dora(LoraVariant):
    """DoRA: the interface's entry point; :meth:`for_layer` picks the Linear, Embedding or Conv form."""

    flag: ClassVar[str] = "use_dora"
    label: ClassVar[str] = "DoRA"
    containers: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector",)
    weighted_merge_refusal: ClassVar[str | None] = "its magnitude vector cannot be combined with other adapters"
    adalora: ClassVar[bool] = False
    lora_bias: ClassVar[bool] = False

    @classmethod
    def for_layer(cls, layer: nn.Module) -> LoraVariant:
        forms = {"linear": DoraLinear, "embedding": DoraEmbedding, "conv": DoraConv}
        kind = getattr(layer, "layer_kind", None)
        if kind not in forms:
            raise ConfigError(f"DoRA is supported on Linear and Conv layers, not on {type(layer.base_layer).__name__}")
        return forms[kind]()

    def magnitude(self, layer: nn.Module, name: str) -> torch.Tensor:
        return layer.lora_magnitude_vector[name].weight

    def row_scale_inputs(self, layer: nn.Module, name: str) -> list[torch.Tensor]:
        return [self.magnitude(layer, name), layer.base_layer.weight]  # the norm reads the base weight


class DoraLinear(Dora):
    """DoRA on a Linear (or ``transformers``' ``Conv1D``) LoRA layer: ``m, n: (out,)``."""

    def init(self, layer: nn.Module, name: str) -> None:
        with torch.no_grad():
            w = layer._base_weight().float() + layer.scaling[name] * layer._lora_weight(name).float()
            magnitude = row_norm(w).to(layer.lora_A[name].weight.dtype)
        layer.lora_magnitude_vector[name] = DoraMagnitude(magnitude)

    def row_scale(self, layer: nn.Module, name: str) -> torch.Tensor:
        """``m / ||W + s B A||_row`` with the norm detached: ``(out,)``."""
        with torch.no_grad():
            w = layer._base_weight()
            lora_w = layer._lora_weight(name).to(w.dtype)
            norm = row_norm(w + layer.scaling[name] * lora_w)
        magnitude = self.magnitude(layer, name)
        return magnitude / norm.to(magnitude.dtype)

    def merged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        # DoRA's norm is the one forward uses, ||W + s B A|| of the base *without* the adapters merged before
        # this one (PEFT's rule); the row scale then applies to the current weight, which holds them, exactly as
        # forward rescales the running output (base + earlier adapters) by m / n.
        unmerged = layer._unmerged_base_weight().to(weight.dtype) + delta
        norm = row_norm(unmerged.T if layer.fan_in_fan_out else unmerged)
        layer._merge_state[name] = norm
        scale = self.magnitude(layer, name).to(weight.dtype) / norm
        return (weight + delta) * (scale[None, :] if layer.fan_in_fan_out else scale[:, None])

    def unmerged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        scale = self.magnitude(layer, name).to(weight.dtype) / layer._merge_state[name]
        return weight / (scale[None, :] if layer.fan_in_fan_out else scale[:, None]) - delta

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + (m/n - 1) ⊙ W x' + (m/n) ⊙ s B A x'`` with ``x' = dropout(x)``: the base part is taken from
        ``result`` (less the bias) unless dropout changed ``x``."""
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_out = result if layer.bias is None else result - layer.bias
        else:
            x = dropout(x)
            base_out = F.linear(x, layer._base_weight().to(x.dtype))
        scale = self.row_scale(layer, name)
        return result + (scale - 1) * base_out + scale * lora_b(lora_a(x)) * layer.scaling[name]

    def fast_path(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """:class:`DoraLinearNode` over a plain dense base, without active dropout (the node has none)."""
        dropout = layer.lora_dropout[name]
        if not ((isinstance(dropout, nn.Identity) or not layer.training)
                and layer._plain_dense_base(x, name, autocast_ok=True)):
            return None
        return DoraLinearNode.apply(x, layer._base_weight(), layer.base_layer.bias, layer.lora_A[name].weight,
                                    layer.lora_B[name].weight, self.magnitude(layer, name),
                                    weight_norm(layer, name), layer.scaling[name], autocast_dtype(x))


@torch.no_grad()
def weight_norm(layer: nn.Module, name: str) -> torch.Tensor:
    """``||W + s B A||_row: (out,)`` of a Linear LoRA layer without forming the ``(out, in)`` matrix ``W + s B A``.

    Expanding the square row by row,

        ||W + s B A||² = ||W||² + 2 s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B),

    costs two reads of ``W`` (a norm, a ``(out, in) x (in, r)`` matmul) and ``(out, r)`` tensors, once per
    forward, instead of writing and reading three ``(out, in)`` temporaries. (Not cached across steps: a
    cache of ``||W||²`` would have to notice every way the base weight can be replaced.)
    """
    w = layer._base_weight()                                                    # (out, in)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    s = layer.scaling[name]
    with torch.autocast(w.device.type, enabled=False):  # in the weights' precision, also under autocast
        weight_sq = torch.linalg.vector_norm(w, dim=1).square_()               # (out,)
        cross = (torch.matmul(w, a.T) * b).sum(1)                              # (out,)
        lora_sq = (torch.matmul(b, torch.matmul(a, a.T)) * b).sum(1)          # (out,)
    norm_sq = weight_sq + (2 * s) * cross + (s * s) * lora_sq
    return norm_sq.clamp_min_(0).sqrt_()


class DoraEmbedding(Dora):
    """DoRA on an embedding: ``m = ||W + ΔW||_col: (dim,)``, ``ΔW = s · (B A)^T: (num, dim)``::

        y = m / ||W + ΔW||_col · (W + ΔW)[ids]

    A base that scales its output (Gemma's ``embed_scale``) scales the adapter's part by the same ``c``.
    """

    def init(self, layer: nn.Module, name: str) -> None:
        """``m = ||W + ΔW||_col: (dim,)``, so the new adapter starts as the identity."""
        with torch.no_grad():
            w = layer.base_layer.weight.float() + layer.get_delta_weight(name).float()      # (num, dim)
            magnitude = w.norm(p=2, dim=0).to(layer.lora_embedding_A[name].dtype)          # (dim,)
        layer.lora_magnitude_vector[name] = DoraMagnitude(magnitude)

    def row_scale(self, layer: nn.Module, name: str) -> torch.Tensor:
        """``m / ||W + ΔW||_col`` with the norm detached: ``(dim,)`` (computed in the wider of the base's and the
        adapter's dtypes, as PEFT does)."""
        with torch.no_grad():
            norm = (layer.base_layer.weight + layer.get_delta_weight(name)).norm(p=2, dim=0)
        magnitude = self.magnitude(layer, name)
        return magnitude / norm.to(magnitude.dtype)

    def merged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        # the norm forward uses: of the base without the adapters merged before this one (see DoraLinear)
        norm = (layer._unmerged_base_weight().to(weight.dtype) + delta).norm(p=2, dim=0)
        layer._merge_state[name] = norm
        scale = self.magnitude(layer, name).to(weight.dtype) / norm
        return (weight + delta) * scale[None, :]

    def unmerged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        scale = self.magnitude(layer, name).to(weight.dtype) / layer._merge_state[name]
        return weight / scale[None, :] - delta

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``(m/n) ⊙ (result + ΔW[ids])``: the running output (base + earlier adapters) is rescaled, as PEFT does.
        ``x`` is the looked-up update ``ΔW[ids]: (..., dim)`` (see :meth:`LoraEmbedding.forward_adapters`)."""
        scale = self.row_scale(layer, name)
        return scale * result + scale * x


class DoraConv(Dora):
    """DoRA on a convolution: ``m: (1, out, 1, ...)`` over ``||W + ΔW||`` per output channel."""

    def init(self, layer: nn.Module, name: str) -> None:
        with torch.no_grad():
            w = layer.base_layer.weight.float()
            norm = row_norm(w + conv_delta(layer, name).float())
        # PEFT keeps the conv magnitude shaped (1, out, 1, ...); the same shape keeps files compatible.
        shape = (1, -1) + (1,) * (w.dim() - 2)
        magnitude = norm.view(shape).to(layer.lora_A[name].weight.dtype)
        layer.lora_magnitude_vector[name] = DoraMagnitude(magnitude)

    def row_scale(self, layer: nn.Module, name: str) -> torch.Tensor:
        """``m / ||W + ΔW||``: ``(1, out, 1, ...)``."""
        with torch.no_grad():
            w = layer.base_layer.weight
            norm = row_norm(w + conv_delta(layer, name).to(w.dtype))
        magnitude = self.magnitude(layer, name)
        return magnitude / norm.view(magnitude.shape).to(magnitude.dtype)

    def merged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        norm = row_norm(layer._unmerged_base_weight().to(weight.dtype) + delta)  # as forward: see DoraLinear
        layer._merge_state[name] = norm
        scale = self.magnitude(layer, name).flatten().to(weight.dtype) / norm
        return (weight + delta) * scale.view(-1, *([1] * (weight.dim() - 1)))

    def unmerged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        scale = self.magnitude(layer, name).flatten().to(weight.dtype) / layer._merge_state[name]
        return weight / scale.view(-1, *([1] * (weight.dim() - 1))) - delta

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """As :meth:`DoraLinear.forward`, with the base convolution (bias-free) where dropout changed ``x``."""
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        bias_shape = (1, -1) + (1,) * (result.dim() - 2)
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_out = result if layer.bias is None else result - layer.bias.view(bias_shape)
        else:
            x = dropout(x)
            base = layer.base_layer
            base_out = base._conv_forward(x, base.weight, None)
        scale = self.row_scale(layer, name)
        return result + (scale - 1) * base_out + scale * lora_b(lora_a(x)) * layer.scaling[name]


def conv_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """The ``ΔW: (out, in/groups, *kernel)`` whose ``||W + ΔW||_row`` DoRA divides by.

    With ``groups == 1`` it is the update itself (``get_delta_weight``). A grouped base has no such update
    (``A`` reads every input channel), so the norm takes PEFT's definition, which files trained there rely on:
    ``s · B A`` with ``B: (out, r/groups)`` read row-major as ``(out/groups, r)``, ``A`` as ``(r, in·k)``, and
    the ``(out/groups, in·k)`` product laid out as ``W``'s shape.
    """
    if layer.base_layer.groups == 1:
        return layer.get_delta_weight(name)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    r = a.shape[0]
    product = b.reshape(-1, r) @ a.reshape(r, -1)                               # (out/groups, in·k)
    return product.reshape(layer.base_layer.weight.shape) * layer.scaling[name]
