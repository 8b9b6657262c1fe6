"""TinyLoRA layers: the frozen truncated SVD of the base weight, mixed by a tiny trained vector through fixed
random tensors.

"Learning to Reason in 13 Parameters" (arXiv:2602.04118), built on LoRA-XS, as PEFT 0.21.2 computes it. For a
base weight ``W: (out, in)`` (GPT-2's ``Conv1D`` stores ``Wᵀ``; an embedding's ``(num_embeddings, dim)`` is read
as ``(out, in)``) with SVD ``W = U Σ Vᵀ`` and ``r' = min(r, out, in)``::

    B = U[:, :r'] diag(√σ[:r']): (out, r')      A = diag(√σ[:r']) Vᵀ[:r']: (r', in)     both frozen
    P: (u, r', r')  frozen, P ~ N(0, 1/r'), drawn from the seed projection_seed + k (k: the layer's index)
    v: (u,)         trained, shared by the targets of one weight-tying group
    R = Σ_i v_i P_i: (r', r')
    ΔW = B R A,     y = W x + b + B R A dropout(x)          x: (..., in), y: (..., out)

For an embedding the row of ``B`` is looked up instead: ``y = W[ids] + dropout(B[ids]) R A``. ``v = 0`` at the
start, so a fresh adapter is the identity; merging adds ``ΔW``.

Where the tensors live (PEFT's names, so files cross): ``tinylora_A``, ``tinylora_B`` and ``tinylora_P`` are the
layer's frozen buffers (``P`` in files only with ``save_projection``; else redrawn from the seed on loading). The
trained vectors are the model's, ``base_model.tinylora_v.<adapter>.<group>`` (filed as ``base_model.tinylora_v.<g>``);
each layer sees its group's vector through a :class:`SharedParameterView`, a view that looks it up on every access and
registers nothing, so it exists once in the state dict and in ``named_parameters``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict
from deltatune.core.shared import SharedParameterView
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def projection(u: int, r: int, seed: int) -> torch.Tensor:
    """``P: (u, r, r)`` with entries ``N(0, 1/r)`` from a CPU generator seeded with ``seed`` (PEFT's draw, so the
    same seed gives the same numbers)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=generator)


class TinyLoraLayer(AdapterLayer):
    """TinyLoRA on ``nn.Linear``, ``nn.Embedding`` or ``transformers``' ``Conv1D``.

    Attributes:
        tinylora_v: ``adapter -> v: (u,)``, the model's trained vector of this layer's group (a view).
        tinylora_A: ``adapter -> A: (r', in)``, frozen.
        tinylora_B: ``adapter -> B: (out, r')``, frozen.
        tinylora_P: ``adapter -> P: (u, r', r')``, frozen (saved only with ``save_projection``).
        r, u: ``adapter -> value`` (``r`` as used: capped at ``min(out, in)``).
        layer_index: The layer's index among the first adapter's targets; every adapter's ``P`` is drawn from
            ``projection_seed + layer_index`` (PEFT fixes it when the layer is first wrapped).
    """

    adapter_layer_names = ("tinylora_v",)
    other_param_names = ("r", "u", "tinylora_dropout", "tinylora_A", "tinylora_B", "tinylora_P")

    def __init__(self, base_layer: nn.Module, vectors: nn.ModuleDict, layer_index: int) -> None:
        super().__init__(base_layer)
        self.tinylora_v = SharedParameterView(vectors)
        self.tinylora_A = ProjectionDict()
        self.tinylora_B = ProjectionDict()
        self.tinylora_P = ProjectionDict()
        self.tinylora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.u: dict[str, int] = {}
        self.layer_index = layer_index
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``ΔW = B R A`` is additive and of rank ``<= r``, so plain LoRA holds it (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, group: str, r: int, u: int, projection_seed: int,
                     save_projection: bool = True, tinylora_dropout: float = 0.0) -> None:
        """Create ``adapter_name`` here: the SVD factors ``A, B`` of the base weight, ``P`` from the seed, and the
        binding to the model's vector ``tinylora_v[adapter_name][group]`` (which must exist already)."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if u <= 0:
            raise ConfigError(f"`u` should be a positive integer value but the value passed is {u}")
        vectors = self.tinylora_v.container
        if adapter_name not in vectors or group not in vectors[adapter_name]:
            raise ConfigError(f"TinyLoRA adapter {adapter_name!r} has no trained vector for group {group}; add it "
                              "through the model")
        self.tinylora_v.bind(adapter_name, group)
        a, b = self._svd_factors(r)
        rank = a.shape[0]
        self.r[adapter_name], self.u[adapter_name] = rank, u
        self.tinylora_A.add(adapter_name, a, persistent=True)
        self.tinylora_B.add(adapter_name, b, persistent=True)
        p = projection(u, rank, projection_seed + self.layer_index).to(a.device)
        self.tinylora_P.add(adapter_name, p, persistent=save_projection)
        self.tinylora_dropout[adapter_name] = nn.Dropout(tinylora_dropout) if tinylora_dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters or [adapter_name])

    def _svd_factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = √σ Vᵀ: (r', in)`` and ``B = U √σ: (out, r')`` of the base weight ``(out, in)``.

        The SVD runs in float32; the factors are formed in the weight's dtype (as PEFT) and kept in float32 over a
        half-precision base (PEFT's adapter-dtype autocast does the same)."""
        weight = self.read_base_weight()
        weight = weight.T if self.fan_in_fan_out else weight
        dtype = weight.dtype
        u_, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        rank = min(r, *weight.shape)
        sqrt_s = torch.sqrt(s[:rank].to(dtype))
        a = (sqrt_s.unsqueeze(1) * vh[:rank].to(dtype)).contiguous()
        b = (u_[:, :rank].to(dtype) * sqrt_s.unsqueeze(0)).contiguous()
        keep = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return a.to(keep), b.to(keep)

    # ---- the update --------------------------------------------------------------------------
    def mixing(self, adapter_name: str) -> torch.Tensor:
        """``R = Σ_i v_i P_i: (r', r')`` in ``v``'s dtype."""
        v = self.tinylora_v[adapter_name]
        p = self.tinylora_P[adapter_name].to(device=v.device, dtype=v.dtype)
        return torch.einsum("i,ijk->jk", v, p)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B R A: (out, in)`` (float32 math), transposed for ``Conv1D``; ``(num_embeddings, dim)`` for an
        embedding."""
        a, b = self.tinylora_A[adapter_name], self.tinylora_B[adapter_name]
        compute = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        delta = b.to(compute) @ self.mixing(adapter_name).to(a.device, compute) @ a.to(compute)
        return delta.T if self.fan_in_fan_out else delta

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active B R A dropout(x)``, ``x: (..., in)``; for an embedding ``base(ids) + Σ_active
        dropout(B[ids]) R A``, ``ids: (...)``."""
        result = self.base_layer(x, *args, **kwargs)
        if self.is_embedding:
            return self._embedding_update(x, result)
        previous_dtype = x.dtype
        for name in self.active_adapters:
            if name not in self.tinylora_A:
                continue
            a, b = self.tinylora_A[name], self.tinylora_B[name]
            h = x.to(a.dtype) if self.cast_input_dtype_enabled else x
            h = self.tinylora_dropout[name](h)
            # B R folded first ((out, r') from r' x r'): two matmuls over the activations, x -> (..., r') -> (..., out)
            br = b @ self.mixing(name).to(b.device, b.dtype)
            result = result + F.linear(F.linear(h, a), br)
        return result.to(previous_dtype)

    def _embedding_update(self, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + dropout(B[ids]) R A`` for each active adapter, in ``result``'s dtype (PEFT's)."""
        for name in self.active_adapters:
            if name not in self.tinylora_A:
                continue
            dtype, device = result.dtype, result.device
            a = self.tinylora_A[name].to(device, dtype)
            b = self.tinylora_B[name].to(device, dtype)
            h = self.tinylora_dropout[name](F.embedding(ids, b))  # (..., r')
            result = result + (h @ self.mixing(name).to(device, dtype)) @ a
        return result


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.Embedding) + ((Conv1D,) if Conv1D is not None else ())
