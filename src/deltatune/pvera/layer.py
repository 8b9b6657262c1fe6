"""PVeRA layers: VeRA whose scaled down-projection is a Gaussian's mean and log-variance, sampled while training.

For ``W: (out, in)`` and ``x: (..., in)``::

    [μ; log σ²] = λ_d ⊙ (A x),   z = μ + σ ⊙ ε (training, or ``sample_at_inference``) else μ,   ε ~ N(0, I)
    y = W x + b + λ_b ⊙ (B z)

``A: (2r, in_max)`` (the mean's ``r`` rows, then the log-variance's) and ``B: (out_max, r)`` are drawn once per
model (Kaiming-uniform from ``projection_prng_key``, as VeRA's), sized for the largest target and sliced,
``A[:, :in]`` and ``B[:out]``, by each layer; only ``λ_d: (2r,)`` and ``λ_b: (out,)`` train. ``λ_b = 0`` at the
start: the model is unchanged. The merged update is the mean's, ``ΔW = diag(λ_b) B diag(λ_d[:r]) A[:r]``, which is
the layer's inference output without sampling.

The projections live once per model in :class:`~deltatune.core.projections.ProjectionDict` containers on the
adapter model (``base_model.pvera_A.<adapter>``, filed as ``base_model.pvera_A`` like PEFT); every layer holds an
unregistered reference to them.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict, kaiming_uniform_projection
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def make_projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (2r, in_max)`` then ``B: (out_max, r)``, Kaiming-uniform from one CPU generator seeded with ``seed``
    (PEFT's draw, so the same seed gives the same projections)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pvera_a = kaiming_uniform_projection((2 * r, in_max), generator)
    pvera_b = kaiming_uniform_projection((out_max, r), generator)
    return pvera_a, pvera_b


class PveraLayer(AdapterLayer):
    """PVeRA on ``nn.Linear`` or ``transformers``' ``Conv1D``.

    Attributes:
        pvera_lambda_b: ``adapter -> λ_b: (out,)``.
        pvera_lambda_d: ``adapter -> λ_d: (2r,)``.
        sample_at_inference: ``adapter -> bool``: sample ``z`` in eval mode too.
        pvera_generator: ``adapter -> CPU torch.Generator`` of the noise ``ε`` (``None``: torch's global one).
        pvera_A, pvera_B: The model's shared :class:`ProjectionDict` s (references, not submodules).
    """

    adapter_layer_names = ("pvera_lambda_b", "pvera_lambda_d")
    other_param_names = ("r", "pvera_dropout", "sample_at_inference", "pvera_generator")

    # supports_lora_conversion stays False, as PEFT's: the trained update is a sample; only its mean merges.

    def __init__(self, base_layer: nn.Module, pvera_A: ProjectionDict, pvera_B: ProjectionDict) -> None:
        super().__init__(base_layer)
        self.pvera_lambda_b = nn.ParameterDict()
        self.pvera_lambda_d = nn.ParameterDict()
        self.pvera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.sample_at_inference: dict[str, bool] = {}
        self.pvera_generator: dict[str, torch.Generator | None] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        # Plain attributes (bypassing nn.Module registration): the model owns the projections.
        self.__dict__["pvera_A"] = pvera_A
        self.__dict__["pvera_B"] = pvera_B

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, pvera_dropout: float = 0.0, init_weights: bool = True,
                     d_initial: float = 0.1, sample_at_inference: bool = False,
                     generator_seed: int | None = None) -> None:
        """Create ``λ_b, λ_d`` for ``adapter_name``; its projections must already be in ``pvera_A/pvera_B``."""
        if adapter_name not in self.pvera_A:
            raise ConfigError(f"PVeRA adapter {adapter_name!r} has no shared projections; add it through the model")
        a_rows, a_cols = self.pvera_A[adapter_name].shape
        b_rows, b_cols = self.pvera_B[adapter_name].shape
        if a_rows != 2 * r or b_cols != r or a_cols < self.in_features or b_rows < self.out_features:
            raise ConfigError(
                f"PVeRA projections of {adapter_name!r} are A ({a_rows}, {a_cols}) / B ({b_rows}, {b_cols}), which do "
                f"not fit this layer (r={r}, in={self.in_features}, out={self.out_features})"
            )
        self.r[adapter_name] = r
        self.sample_at_inference[adapter_name] = sample_at_inference
        # As PEFT: each layer's generator starts from the same seed, so every layer draws the same noise sequence.
        self.pvera_generator[adapter_name] = (None if generator_seed is None
                                              else torch.Generator().manual_seed(generator_seed))
        self.pvera_dropout[adapter_name] = nn.Dropout(pvera_dropout) if pvera_dropout > 0 else nn.Identity()
        if init_weights:
            lambda_b, lambda_d = torch.zeros(self.out_features), torch.full((2 * r,), float(d_initial))
        else:
            lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(2 * r)
        self.pvera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.pvera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _projections(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:, :in]: (2r, in)`` and ``B[:out]: (out, r)`` on ``like``'s device and dtype."""
        a = self.pvera_A[adapter_name][:, : self.in_features]
        b = self.pvera_B[adapter_name][: self.out_features]
        return a.to(like.device, like.dtype), b.to(like.device, like.dtype)

    def _sample(self, adapter_name: str, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``z = μ + exp(log σ² / 2) ⊙ ε`` while training (or with ``sample_at_inference``), else ``μ``."""
        if not (self.training or self.sample_at_inference[adapter_name]):
            return mu
        std = torch.exp(0.5 * logvar)
        generator = self.pvera_generator[adapter_name]
        if generator is None:
            eps = torch.randn_like(std)
        else:  # a CPU generator (nn.Module.to does not move it): draw there, then move the noise
            eps = torch.randn(std.shape, dtype=std.dtype, generator=generator).to(std.device)
        return mu + eps * std

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = (λ_b ⊙_rows B) (λ_d[:r] ⊙_rows A[:r]): (out, in)`` (the mean's path), transposed for ``Conv1D``."""
        lambda_b, lambda_d = self.pvera_lambda_b[adapter_name], self.pvera_lambda_d[adapter_name]
        a, b = self._projections(adapter_name, lambda_d)
        r = self.r[adapter_name]
        delta = (lambda_b[:, None] * b) @ (lambda_d[:r, None] * a[:r])
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + λ_b ⊙ (B z)``, ``[μ; log σ²] = λ_d ⊙ (A dropout(x))``, for each active adapter;
        ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.pvera_lambda_d:
                continue
            lambda_b, lambda_d = self.pvera_lambda_b[name], self.pvera_lambda_d[name]
            a, b = self._projections(name, lambda_d)
            h = self.pvera_dropout[name](x.to(lambda_d.dtype))
            mu, logvar = (lambda_d * (h @ a.T)).chunk(2, dim=-1)
            result = result + lambda_b * (self._sample(name, mu, logvar) @ b.T)
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
