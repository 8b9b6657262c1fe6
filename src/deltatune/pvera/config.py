"""``PveraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class PveraConfig(PeftConfig):
    """Probabilistic VeRA (PVeRA, https://www.arxiv.org/abs/2512.07703): VeRA whose scaled down-projection gives a
    mean and a log-variance, ``[μ; log σ²] = λ_d ⊙ (A x)``, and whose up-projection reads a sample
    ``z = μ + σ ⊙ ε`` while training (``z = μ`` at inference unless ``sample_at_inference``):
    ``y = W x + λ_b ⊙ (B z)`` with ``A: (2r, in)``, ``B: (out, r)`` frozen, random and shared by every layer.

    Args:
        r: Size of the sample ``z`` (``A`` has ``2r`` rows: the mean's and the log-variance's); larger than a LoRA
            rank, since only ``out + 2r`` values train per layer.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (VeRA's table, as PEFT). Linear layers (and GPT-2's ``Conv1D``) only.
        projection_prng_key: Seed of the projections ``A`` and ``B``.
        save_projection: Save ``A`` and ``B`` in the adapter file (safe everywhere); ``False`` makes the file tiny
            and redraws them from the seed when loading (same torch version/CPU generator needed).
        pvera_dropout: Dropout on the adapter's input.
        d_initial: Initial value of every ``λ_d`` entry (``λ_b`` starts at zero, so the model is unchanged).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"pvera_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``λ_b = 0``, ``λ_d = d_initial``; ``False``: ``λ_b = 1``, ``λ_d ~ N(0, 1)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        sample_at_inference: Sample ``z`` in eval mode too (else its mean; merging always uses the mean).
        generator_seed: Seed of the noise ``ε`` (one CPU generator per adapter and layer); ``None``: torch's global
            generator.
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "pvera_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sample_at_inference: bool = False
    generator_seed: int | None = None

    # PEFT's PveraConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain
    # class attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PVERA
        super().__post_init__()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        check_layer_selection(self)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}. "
                              "(PveraConfig.r is the size of the sampled code; try r=256)")
        if not 0.0 <= float(self.pvera_dropout) < 1.0:
            raise ConfigError(f"pvera_dropout must be in [0, 1), got {self.pvera_dropout!r}")
        if self.bias not in ("none", "all", "pvera_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'pvera_only'")
        for name in ("projection_prng_key", "generator_seed"):
            value = getattr(self, name)
            if (value is not None or name == "projection_prng_key") and (
                    not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be an integer seed, got {value!r}")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save pvera_A and pvera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
