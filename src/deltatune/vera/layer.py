"""VeRA layers: trainable scaling vectors around frozen random projections shared by all layers.

Kopiczko et al., 2023, "VeRA: Vector-based Random Matrix Adaptation". For ``W: (out, in)``::

    y = W x + b + λ_b ⊙ (B (λ_d ⊙ (A x))),   ΔW = diag(λ_b) B diag(λ_d) A

``A: (r, in_max)`` and ``B: (out_max, r)`` are drawn once per adapter (Kaiming-uniform from the seed
``projection_prng_key``), sized for the largest adapted layer and sliced, ``A[:, :in]`` and ``B[:out]``, by
each layer. Only ``λ_d: (r,)`` and ``λ_b: (out,)`` train. ``λ_b = 0`` at the start: the model is unchanged.

The projections live once per model, in :class:`~deltatune.core.projections.ProjectionDict` containers on the
adapter model (``base_model.vera_A.<adapter>``, filed as ``base_model.vera_A`` like PEFT); every layer holds an
unregistered reference to them, so they are neither duplicated in the state dict nor in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict, kaiming_uniform_projection
from deltatune.errors import ConfigError
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def make_projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, in_max)`` then ``B: (out_max, r)`` from one CPU generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = kaiming_uniform_projection((r, in_max), generator)
    vera_b = kaiming_uniform_projection((out_max, r), generator)
    return vera_a, vera_b


def base_features(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear layer (``Conv1D`` stores ``W: (in, out)``), unwrapping a VeRA layer."""
    base = module.base_layer if isinstance(module, VeraLayer) else module
    rows, cols = dense_weight_shape(base)
    return (cols, rows) if Conv1D is not None and isinstance(base, Conv1D) else (rows, cols)


class VeraLayer(AdapterLayer):
    """VeRA on ``nn.Linear`` or ``transformers``' ``Conv1D``.

    Attributes:
        vera_lambda_b: ``adapter -> λ_b: (out,)``.
        vera_lambda_d: ``adapter -> λ_d: (r,)``.
        vera_A, vera_B: The model's shared :class:`ProjectionDict` s (references, not submodules).
    """

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """VeRA's update ``Λ_b B Λ_d A`` is additive, so plain LoRA can hold it (PEFT's)."""
        return True

    def __init__(self, base_layer: nn.Module, vera_A: ProjectionDict, vera_B: ProjectionDict) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = base_features(base_layer)
        # Plain attributes (bypassing nn.Module registration): the model owns the projections.
        self.__dict__["vera_A"] = vera_A
        self.__dict__["vera_B"] = vera_B

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, vera_dropout: float = 0.0, init_weights: bool = True,
                     d_initial: float = 0.1) -> None:
        """Create ``λ_b, λ_d`` for ``adapter_name``; its projections must already be in ``vera_A/vera_B``."""
        if adapter_name not in self.vera_A:
            raise ConfigError(f"VeRA adapter {adapter_name!r} has no shared projections; add it through the model")
        a_rows, a_cols = self.vera_A[adapter_name].shape
        b_rows = self.vera_B[adapter_name].shape[0]
        if a_rows < r or a_cols < self.in_features or b_rows < self.out_features:
            raise ConfigError(
                f"VeRA projections of {adapter_name!r} are (r={a_rows}, in={a_cols}) / (out={b_rows}), too small for "
                f"this layer (r={r}, in={self.in_features}, out={self.out_features})"
            )
        self.r[adapter_name] = r
        self.vera_dropout[adapter_name] = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()
        if init_weights:
            lambda_b, lambda_d = torch.zeros(self.out_features), torch.full((r,), float(d_initial))
        else:
            lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _projections(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:r, :in]: (r, in)`` and ``B[:out, :r]: (out, r)`` on ``like``'s device and dtype.

        The pair is shared by all the model's VeRA adapters and sized for the first one (rank ``r0 >= r``), so a
        further adapter with a smaller ``r`` uses its first ``r`` rows / columns."""
        r = self.r[adapter_name]
        a = self.vera_A[adapter_name][:r, : self.in_features]
        b = self.vera_B[adapter_name][: self.out_features, :r]
        return a.to(like.device, like.dtype), b.to(like.device, like.dtype)

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = (λ_b ⊙_rows B) (λ_d ⊙_rows A): (out, in)``, transposed for ``Conv1D``."""
        lambda_b, lambda_d = self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name]
        a, b = self._projections(adapter_name, lambda_d)
        delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + λ_b ⊙ (B (λ_d ⊙ (A dropout(x))))`` for each active adapter; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.vera_lambda_d:
                continue
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            a, b = self._projections(name, lambda_d)
            h = self.vera_dropout[name](x.to(lambda_d.dtype))
            result = result + lambda_b * ((lambda_d * (h @ a.T)) @ b.T)
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
