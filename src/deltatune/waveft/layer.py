"""WaveFT layers: a weight update that is sparse in the wavelet domain (Bilican et al., 2025, "Exploring Sparsity for
Parameter Efficient Fine Tuning Using Wavelets").

For ``W: (out, in)``, ``n`` trained coefficients ``waveft_spectrum: (n,)`` (PEFT's name, so files cross) sit at ``n``
positions ``(r_t, c_t)`` of an ``out x in`` grid, the first ``n`` of ``torch.randperm(out · in)`` drawn from
``random_loc_seed`` (``r = i // in``, ``c = i % in``; recomputed from the seed, never saved). With the wavelet's
filter length ``L``, the grid is padded to ``S: (H, W)``, ``H = out + L - 2`` and ``W = in + L - 2`` each rounded up
to even, with the coefficients shifted by ``((H - out) // 2, (W - in) // 2)``; its quarters are the bands of one
level of the 2-D inverse transform (:func:`deltatune.waveft.wavelets.idwt2`; the layer sums it over the ``n``
coefficients alone, :func:`wavelet_delta`)::

    S = [[A, Hz],        ΔW = scaling · IDWT(A, Hz, V, D)[:out, :in]
         [V,  D]]        y  = W x + b + ΔW x

(``IDWT`` of ``(H, W)`` coefficients has ``(H - L + 2, W - L + 2)`` entries: ``out`` or ``out + 1`` rows, and the
first ``out`` are kept, as PEFT's centred crop does.) With ``use_idwt=False``, ``ΔW = scaling · S`` unpadded: the
coefficients are ``ΔW``'s entries. ``ΔW`` is linear in the coefficients, so merging is exact (``W' = W + ΔW``). Zero
coefficients (``init_weights=True``) make the adapter the identity.

Supported bases: ``nn.Linear`` and ``transformers``' ``Conv1D`` (``W`` stored ``(in, out)``: ``ΔW`` is transposed to
merge), as PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError
from deltatune.waveft.wavelets import reconstruction_filters

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def coefficient_positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """``(2, n)`` long: rows and columns of the first ``n`` entries of a seeded permutation of ``out · in`` (PEFT's
    draw, so both libraries put a file's coefficients in the same places)."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features])


def wavelet_delta(spectrum: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int], wavelet: str,
                  use_idwt: bool) -> torch.Tensor:
    """``ΔW / scaling: (out, in)`` from the coefficients ``spectrum: (n,)`` at ``positions: (2, n)`` (see the
    module docstring), in ``spectrum``'s dtype and device.

    The inverse transform is linear, so it is summed coefficient by coefficient: a coefficient at ``(i, j)`` of its
    band adds ``s · f_row ⊗ f_col`` (``L x L``) at rows ``2i ...``, columns ``2j ...`` of the full synthesis, cropped
    by ``L - 2`` (the formula of :func:`deltatune.waveft.wavelets.idwt2`). Only ``n L²`` values are touched, not the
    ``(H, W)`` grid of mostly zeros (10x faster than the dense transform on a 576x576 layer).
    """
    out_features, in_features = shape
    rows, cols = positions.to(spectrum.device)
    if not use_idwt:
        return spectrum.new_zeros(out_features, in_features).index_put((rows, cols), spectrum)
    lo, hi = (f.to(spectrum.device, spectrum.dtype) for f in reconstruction_filters(wavelet))
    length = lo.shape[0]
    crop = length - 2  # what the inverse transform's filtering takes off each side
    height, width = out_features + crop, in_features + crop
    height, width = height + height % 2, width + width % 2
    h2, w2 = height // 2, width // 2
    r = rows + (height - out_features) // 2  # the place in the padded grid S
    c = cols + (width - in_features) // 2
    lower, right = r >= h2, c >= w2
    i, j = r - h2 * lower, c - w2 * right  # the place in its band
    # bands by quarter: A (lo, lo) top-left, Hz (hi, lo) top-right, V (lo, hi) bottom-left, D (hi, hi): the row
    # filter is hi on the right half, the column filter hi on the lower half
    f_row = torch.where(right[:, None], hi, lo)  # (n, L)
    f_col = torch.where(lower[:, None], hi, lo)
    atoms = spectrum[:, None, None] * f_row[:, :, None] * f_col[:, None, :]  # (n, L, L)
    steps = torch.arange(length, device=spectrum.device)
    full_height, full_width = 2 * h2 + crop, 2 * w2 + crop
    flat = (2 * i[:, None, None] + steps[:, None]) * full_width + 2 * j[:, None, None] + steps
    full = spectrum.new_zeros(full_height * full_width).index_add(0, flat.flatten(), atoms.flatten())
    return full.view(full_height, full_width)[crop: crop + out_features, crop: crop + in_features]


class WaveFTLayer(AdapterLayer):
    """WaveFT on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        waveft_spectrum: Per adapter, the trained coefficients ``(n_frequency,)``.
        waveft_indices: Per adapter, their positions ``(2, n_frequency)`` in the ``out x in`` grid.
        waveft_n_frequency, waveft_scaling, waveft_random_loc_seed, waveft_wavelet_family, waveft_use_idwt: Per
            adapter, the config's values (PEFT's attribute names).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("waveft_spectrum",)
    other_param_names = ("waveft_n_frequency", "waveft_scaling", "waveft_random_loc_seed", "waveft_wavelet_family",
                         "waveft_indices", "waveft_use_idwt")
    peft_class_name = "WaveFTLinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.waveft_spectrum = nn.ParameterDict()
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        self.waveft_indices: dict[str, torch.Tensor] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The update is additive (``W' = W + ΔW``) and :meth:`get_delta_weight` has the weight's layout, so LoRA can
        approximate it, on ``Conv1D`` too (PEFT says no there, as its ``ΔW`` is not transposed)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, n_frequency: int, scaling: float = 25.0, wavelet_family: str = "db1",
                     use_idwt: bool = True, random_loc_seed: int = 777, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name`` with ``n_frequency`` coefficients (PEFT's checks and initialisation)."""
        size = self.in_features * self.out_features
        if n_frequency <= 0:
            raise ConfigError(f"`n_frequency` should be a positive integer value but the value passed is {n_frequency}")
        if n_frequency > size:
            raise ConfigError(f"`n_frequency` should be less than or equal to the product of the input and output "
                              f"dimensions but the value passed is {n_frequency} and the product is {size}")
        self.waveft_n_frequency[adapter_name] = n_frequency
        self.waveft_scaling[adapter_name] = scaling
        self.waveft_random_loc_seed[adapter_name] = random_loc_seed
        self.waveft_wavelet_family[adapter_name] = wavelet_family
        self.waveft_use_idwt[adapter_name] = use_idwt
        positions = coefficient_positions(self.out_features, self.in_features, n_frequency, random_loc_seed)
        self.waveft_indices[adapter_name] = positions.to(self.base_layer.weight.device)
        # PEFT's: zeros (the identity), else N(0, 0.01²) from the global generator
        values = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency) * 0.01
        self.waveft_spectrum[adapter_name] = nn.Parameter(values)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)`` in the coefficients' dtype (fp32 over a half-precision base)."""
        spectrum = self.waveft_spectrum[adapter_name]
        delta = wavelet_delta(spectrum, self.waveft_indices[adapter_name], (self.out_features, self.in_features),
                              self.waveft_wavelet_family[adapter_name], self.waveft_use_idwt[adapter_name])
        return delta * self.waveft_scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's layout (transposed for ``Conv1D``), in the coefficients' dtype."""
        delta = self._delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active x ΔWᵀ``; ``x: (..., in)`` → ``(..., out)``, in the base output's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.waveft_spectrum:
                continue
            delta = self._delta(name)
            h = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
            result = result + F.linear(h, delta)
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_waveft_layer(target: nn.Module) -> WaveFTLayer | None:
    """The WaveFT wrapper for ``target``, or ``None`` if WaveFT cannot adapt its type."""
    return WaveFTLayer(target) if isinstance(target, supported_types()) else None
