"""C3A layers: a block-circulant update applied with FFTs (Chen et al., 2024, "Parameter-Efficient Fine-Tuning
via Circular Convolution", arXiv 2407.19342).

For a base weight ``W: (out, in)`` and block size ``b`` (dividing both), the adapter is one kernel
``c3a_kernel: (m, n, b)`` with ``m = out / b``, ``n = in / b`` (PEFT's name and layout, so files cross). Split
``x: (..., in)`` into ``n`` chunks ``x_j: (..., b)``; output chunk ``i`` is::

    y_i[u] = (1 / in) Σ_j Σ_s w_ij[s] · x_j[(u + s) mod b]        (a circular cross-correlation)
           = (1 / in) Σ_j irfft(rfft(x_j) · conj(rfft(w_ij)))[u]

so ``ΔW`` is the block matrix of circulants ``C_ij[u, t] = w_ij[(t - u) mod b] / in``, and
``y = W x + b + ΔW x``. ``out · in / b`` values train. The kernel is kept in float32 and the FFTs run in float32
(PEFT's: half-precision FFTs are not widely supported). ``init_weights=True`` (zeros) makes the adapter the
identity; PEFT's default (``"xavier_uniform"``) does not.

Several active adapters add their updates, ``y = W x + Σ_k ΔW_k x`` (what merging them gives). PEFT 0.21.2's
forward instead feeds each adapter the previous adapter's output; with one active adapter both agree.

Supported bases: ``nn.Linear`` (PEFT's only one) and ``transformers``' ``Conv1D`` (``W`` stored ``(in, out)``:
``ΔW`` is transposed to merge; PEFT refuses it, so such a file does not load in PEFT).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def circular_apply(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``ΔW x`` without the ``1 / in`` factor: ``x: (..., n b)``, ``kernel: (m, n, b)`` → ``(..., m b)``, float32."""
    m, n, b = kernel.shape
    xf = torch.fft.rfft(x.to(torch.float32).reshape(*x.shape[:-1], n, b))  # (..., n, b//2+1)
    wf = torch.fft.rfft(kernel.to(torch.float32)).conj()  # (m, n, b//2+1)
    yf = torch.einsum("...nk,mnk->...mk", xf, wf)
    return torch.fft.irfft(yf, n=b).reshape(*x.shape[:-1], m * b)


def circulant_dense(kernel: torch.Tensor) -> torch.Tensor:
    """The dense ``(m b, n b)`` matrix of :func:`circular_apply`: block ``(i, j)`` is ``C[u, t] = w_ij[(t-u) % b]``."""
    m, n, b = kernel.shape
    idx = (torch.arange(b, device=kernel.device)[None, :] - torch.arange(b, device=kernel.device)[:, None]) % b
    blocks = kernel[:, :, idx]  # (m, n, b_u, b_t)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


class C3ALayer(AdapterLayer):
    """C3A on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        c3a_kernel: Per adapter, the kernels ``(out/b, in/b, b)``, float32.
        block_size: Per adapter, ``b``.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size",)
    peft_class_name = "C3ALinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.c3a_kernel = nn.ParameterDict()
        self.block_size: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The update is additive (``W' = W + ΔW``), so LoRA can approximate it (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, block_size: int, init_weights: bool | str | None = "xavier_uniform"
                     ) -> None:
        """Create adapter ``adapter_name`` with block size ``block_size`` and initialise it (PEFT's checks)."""
        if block_size <= 0:
            raise ConfigError(f"`block_size` should be a positive integer value but the value passed is {block_size}")
        if self.in_features % block_size != 0:
            raise ConfigError(f"The block size should be a factor of the input size. However, the input size is "
                              f"{self.in_features} and the block size is {block_size}")
        if self.out_features % block_size != 0:
            raise ConfigError(f"The block size should be a factor of the output size. However, the output size is "
                              f"{self.out_features} and the block size is {block_size}")
        self.block_size[adapter_name] = block_size
        shape = (self.out_features // block_size, self.in_features // block_size, block_size)
        self.c3a_kernel[adapter_name] = nn.Parameter(torch.zeros(shape, dtype=torch.float32))
        self._init_weights(adapter_name, init_weights)
        weight = self.base_layer.weight
        # float32 always (not the base's dtype): the FFTs run in float32, as PEFT's
        self.c3a_kernel[adapter_name] = nn.Parameter(self.c3a_kernel[adapter_name].data.to(weight.device))
        self.set_adapter(self.active_adapters or [adapter_name])

    @torch.no_grad()
    def _init_weights(self, adapter_name: str, init_weights: bool | str | None) -> None:
        """PEFT's: ``True`` zeros; ``"gaussian"`` ``N(0, 1)``; ``"xavier_uniform"``/``False``
        ``U(±sqrt(6 / (in + out)))``; ``"kaiming_uniform"`` ``U(±1 / sqrt(in))``."""
        kernel = self.c3a_kernel[adapter_name]
        if init_weights is True:
            return
        if init_weights == "gaussian":
            nn.init.normal_(kernel)
        elif init_weights in ("xavier_uniform", False):
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(self.in_features + self.out_features))
            nn.init.uniform_(kernel, -bound, bound)
        elif init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / float(self.in_features))
            nn.init.uniform_(kernel, -bound, bound)
        else:
            raise ConfigError(f"Unknown init_weights: {init_weights}")

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active circular_apply(x, w) / in``; ``x: (..., in)`` → ``(..., out)``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.c3a_kernel:
                continue
            result = result + (circular_apply(x, self.c3a_kernel[name]) / self.in_features).to(result.dtype)
        return result

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` (block circulants over ``in``) in the base weight's layout and dtype (transposed for ``Conv1D``)."""
        weight = self.base_layer.weight
        delta = (circulant_dense(self.c3a_kernel[adapter_name].to(torch.float32)) / self.in_features)
        delta = delta.to(weight.dtype if weight.is_floating_point() else torch.float32)
        return delta.T if self.fan_in_fan_out else delta


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_c3a_layer(target: nn.Module) -> C3ALayer | None:
    """The C3A wrapper for ``target``, or ``None`` if C3A cannot adapt its type."""
    return C3ALayer(target) if isinstance(target, supported_types()) else None
