"""VB-LoRA layers: LoRA factors assembled from a vector bank shared by all layers (Li et al., NeurIPS 2024).

For ``W: (out, in)``, rank ``r``, a bank ``V: (N, ℓ)`` (``vblora_vector_bank``, one per adapter, held once per model)
and logits ``vblora_logits_A: (r, in/ℓ, N)``, ``vblora_logits_B: (out/ℓ, r, N)`` (PEFT's names and layouts, so files
cross), each sub-vector is a softmax mix of its ``k`` best-scoring bank vectors::

    mix(z) = Σ_{j ∈ topk(z)} softmax(z_topk)_j · V[j]                (ℓ,)
    A[p, c ℓ : (c+1) ℓ] = mix(logits_A[p, c])          A: (r, in)
    B[o ℓ : (o+1) ℓ, p] = mix(logits_B[o, p])          B: (out, r)
    y = W x + b + B A dropout(x),    ΔW = B A

Only the ``k`` chosen vectors of each sub-vector get gradient through the mix (and their logits). The update is
not scaled and does not start at zero (PEFT's init: ``V ~ U(±bound)``, logits ``~ N(0, std²)``), so a fresh adapter
changes the output slightly. ``ΔW`` is additive: merging is exact.

Supported bases: ``nn.Linear`` and ``transformers``' ``Conv1D`` (``W`` stored ``(in, out)``: ``ΔW`` transposed to
merge), as PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def mix_bank(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``(..., N)`` logits → ``(..., ℓ)``: the softmax over the ``topk`` largest logits weighs their bank rows."""
    top, index = logits.topk(topk, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return torch.einsum("...k,...kl->...l", weights, bank[index])


class VBLoRALayer(AdapterLayer):
    """VB-LoRA on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        vblora_logits_A, vblora_logits_B: Per adapter, the logits ``(r, in/ℓ, N)`` and ``(out/ℓ, r, N)``.
        vblora_vector_bank: The model's shared bank container (``{adapter: (N, ℓ)}``), a reference, not a
            submodule: it is saved once, as ``base_model.vblora_vector_bank`` (PEFT's file key).
        r, topk: Per adapter.
        vblora_dropout: Per adapter, dropout on the adapter's input (``nn.Identity`` at 0).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")
    other_param_names = ("r", "topk", "vblora_dropout")

    def __init__(self, base_layer: nn.Module, vector_bank: nn.ParameterDict) -> None:
        super().__init__(base_layer)
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.vblora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.__dict__["vblora_vector_bank"] = vector_bank  # shared by every layer: not registered here
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``ΔW = B A`` is a LoRA (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, topk: int, num_vectors: int, vector_length: int,
                     vblora_dropout: float = 0.0, init_logits_std: float = 0.1) -> None:
        """Create ``adapter_name``'s logits ``~ N(0, init_logits_std²)`` (PEFT's checks, in PEFT's order); its bank
        must be in the shared container already."""
        if r <= 0:
            raise ConfigError(f"`r` {r} should be a positive integer value")
        if topk <= 0:
            raise ConfigError(f"`topk` {topk} should be a positive integer value")
        if self.in_features % vector_length != 0:
            raise ConfigError(f"`in_features` {self.in_features} must be divisible by `vector_length` {vector_length}")
        if self.out_features % vector_length != 0:
            raise ConfigError(f"`out_features` {self.out_features} must be divisible by `vector_length` "
                              f"{vector_length}")
        if topk > num_vectors:
            raise ConfigError(f"`topk` {topk} is larger than `num_vectors` {num_vectors}: each sub-vector mixes topk "
                              "of the bank's vectors; use topk <= num_vectors")
        self.r[adapter_name] = r
        self.topk[adapter_name] = topk
        self.vblora_dropout[adapter_name] = nn.Dropout(vblora_dropout) if vblora_dropout > 0 else nn.Identity()
        logits_a = torch.zeros(r, self.in_features // vector_length, num_vectors)
        logits_b = torch.zeros(self.out_features // vector_length, r, num_vectors)
        nn.init.normal_(logits_a, 0, init_logits_std)  # PEFT's order: A, then B
        nn.init.normal_(logits_b, 0, init_logits_std)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_a.to(weight.device, dtype))
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_b.to(weight.device, dtype))
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def lora_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (r, in), B: (out, r))`` assembled from the bank (see the module docstring).

        Raises:
            RuntimeError: training an adapter loaded from a ``save_only_topk_weights`` file (PEFT's refusal).
        """
        logits_a, logits_b = self.vblora_logits_A[adapter_name], self.vblora_logits_B[adapter_name]
        if self.training and logits_a[0, 0].isinf().any():
            raise RuntimeError("Found infinity values in VB-LoRA logits. Ensure training was not resumed from a "
                               "`save_only_topk_weights` model. (Such a file keeps only the top-k logits; train from "
                               "a file saved with save_only_topk_weights=False.)")
        bank = self.vblora_vector_bank[adapter_name].to(logits_a.device)
        topk = self.topk[adapter_name]
        a = mix_bank(logits_a, bank, topk).reshape(logits_a.shape[0], -1)  # (r, in/ℓ, ℓ) -> (r, in)
        b = mix_bank(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])  # (out/ℓ, ℓ, r) -> (out, r)
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B A`` in the base weight's layout (transposed for ``Conv1D``), in the adapter's dtype."""
        a, b = self.lora_matrices(adapter_name)
        delta = b @ a
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active B (A dropout(x))``; ``x: (..., in)`` → ``(..., out)``, in the base output's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.vblora_logits_A:
                continue
            a, b = self.lora_matrices(name)
            h = x.to(a.dtype) if self.cast_input_dtype_enabled else x
            result = result + F.linear(F.linear(self.vblora_dropout[name](h), a), b)
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
