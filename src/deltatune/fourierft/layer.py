"""FourierFT layers: a weight update learned as a few entries of its 2-D spectrum (Gao et al., ICML 2024,
"Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", arXiv 2405.03003).

For ``W0: (out, in)``, ``n`` learned values ``c: (n,)`` (``fourierft_spectrum``, PEFT's name) sit at fixed positions
``(p_l, q_l)`` of an otherwise zero ``(out, in)`` spectrum ``F``; the positions are the first ``n`` entries of
``randperm(out · in)`` drawn from a generator seeded with ``random_loc_seed`` (row ``idx // in``, column
``idx % in``, as PEFT, so both libraries find the same ones: they are not stored in the file)::

    F[p_l, q_l] = c_l
    ΔW[u, v]    = scaling · Re(IDFT2(F))[u, v] = scaling / (out · in) · Σ_l c_l cos(2π (p_l u / out + q_l v / in))
    y           = W0 x + b + ΔW x

Only ``n`` values train per layer, whatever its size, and ``ΔW`` is dense (every entry moves). The transform
runs in float32 (half-precision FFTs are not widely supported), the spectrum is kept float32, and ``ΔW`` is
formed in each forward (PEFT's). ``init_weights=False`` (PEFT's default) draws ``c ~ N(0, 1)``: the adapter
does not start as the identity; ``True`` starts it at zero.

Supported bases: ``nn.Linear`` and ``transformers``' ``Conv1D`` (``W0`` stored ``(in, out)``; the spectrum is laid
out over ``(out, in)`` all the same, as PEFT, and ``ΔW`` is transposed to merge). Merging is ``W0 + ΔW``.
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


def spectral_positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """PEFT's positions: ``(2, n)`` long, rows then columns of the first ``n`` of ``randperm(out · in)`` drawn from
    a CPU generator seeded with ``seed``."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


def spectral_delta(spectrum: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float
                   ) -> torch.Tensor:
    """``scaling · Re(ifft2(F))``, ``F: shape`` zero but ``F[indices[0], indices[1]] = spectrum``; float32."""
    dense = torch.zeros(shape, device=spectrum.device, dtype=torch.float32)
    dense = dense.index_put((indices[0].to(spectrum.device), indices[1].to(spectrum.device)),
                            spectrum.to(torch.float32))
    return torch.fft.ifft2(dense).real * scaling


class FourierFTLayer(AdapterLayer):
    """FourierFT on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        fourierft_spectrum: Per adapter, the learned entries ``(n,)``, float32.
        fourierft_n_frequency, fourierft_scaling, fourierft_random_loc_seed: Per adapter, ``n``, ``scaling`` and the
            positions' seed.
        indices: Per adapter, the positions ``(2, n)`` (rows, columns of the ``(out, in)`` spectrum), on the CPU.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed", "indices")
    peft_class_name = "FourierFTLinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fourierft_spectrum = nn.ParameterDict()
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The update is additive (``W' = W + ΔW``), so LoRA can approximate it. (PEFT says ``False`` for ``Conv1D``
        because its ``get_delta_weight`` keeps the ``(out, in)`` layout there; this one returns the base's.)"""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, n_frequency: int, scaling: float = 150.0, random_loc_seed: int = 777,
                     init_weights: bool = False) -> None:
        """Create adapter ``adapter_name``: draw its positions and its spectrum (PEFT's checks and sentences).

        Raises:
            ConfigError: ``n_frequency <= 0`` or more than ``in · out`` entries.
        """
        size = self.in_features * self.out_features
        if n_frequency <= 0:
            raise ConfigError(f"`n_frequency` should be a positive integer value but the value passed is {n_frequency}")
        if n_frequency > size:
            raise ConfigError(f"`n_frequency` should be less than or equal to the product of the input and output "
                              f"dimensions but the value passed is {n_frequency} and the product is {size}; lower "
                              "n_frequency, or give this layer less in n_frequency_pattern")
        self.fourierft_n_frequency[adapter_name] = n_frequency
        self.fourierft_scaling[adapter_name] = scaling
        self.fourierft_random_loc_seed[adapter_name] = random_loc_seed
        self.indices[adapter_name] = spectral_positions(self.out_features, self.in_features, n_frequency,
                                                        random_loc_seed)
        spectrum = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
        # float32 always (not the base's dtype): the transform runs in float32, as PEFT's
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(self.base_layer.weight.device))
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)``, float32."""
        return spectral_delta(self.fourierft_spectrum[adapter_name], self.indices[adapter_name],
                              (self.out_features, self.in_features), self.fourierft_scaling[adapter_name])

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active ΔW x`` (float32); ``x: (..., in)`` → ``(..., out)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.fourierft_spectrum:
                continue
            delta = self._delta(name)
            h = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
            result = result + F.linear(h, delta).to(out_dtype)
        return result

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's layout (transposed for ``Conv1D``), float32."""
        delta = self._delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_fourierft_layer(target: nn.Module) -> FourierFTLayer | None:
    """The FourierFT wrapper for ``target``, or ``None`` if FourierFT cannot adapt its type."""
    return FourierFTLayer(target) if isinstance(target, supported_types()) else None
