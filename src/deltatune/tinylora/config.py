"""``TinyLoraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class TinyLoraConfig(PeftConfig):
    """TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118): LoRA-XS's frozen truncated SVD of each
    base weight, ``W ≈ B A`` with ``B = U_r √Σ_r: (out, r)`` and ``A = √Σ_r V_rᵀ: (r, in)``, and between them an
    ``r x r`` mixing matrix made from a tiny trained vector through fixed random tensors,
    ``ΔW = B (Σ_i v_i P_i) A`` (see :mod:`deltatune.tinylora.layer`).

    Args:
        r: Rank of the frozen SVD factors (the paper recommends 2); capped at ``min(out, in)`` per layer.
        u: Length of each trained vector ``v`` (and the number of random ``r x r`` tensors ``P_i`` per layer).
        weight_tying: How many targets share one ``v``, from ``0.0`` (each its own) to ``1.0`` (one ``v`` for the
            whole model): the targets, in model order, are split into ``round(n · (1 - weight_tying))`` groups.
        projection_seed: Seed of the random tensors; layer ``k`` (in target order) draws from
            ``projection_seed + k``.
        save_projection: Save the ``P`` tensors in the adapter file (safe everywhere); ``False`` makes the file
            smaller and redraws them from the seed when loading (same torch version/CPU generator needed).
        init_v_bound: ``init_weights="uniform"`` draws ``v`` from ``U(-init_v_bound, init_v_bound)``.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). ``nn.Linear``, ``nn.Embedding`` and GPT-2's ``Conv1D``.
        tinylora_dropout: Dropout on the adapter's input (on the looked-up ``B`` rows for an embedding).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"tinylora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``v = 0`` (the model is unchanged); ``"uniform"``: ``v ~ U(-b, b)`` with
            ``b = init_v_bound``; ``False``: PEFT leaves ``v`` uninitialised memory, deltatune draws it as
            ``"uniform"`` (never garbage, which may hold NaN).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: list[str] | set[str] | str | None = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "tinylora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool | Literal["uniform"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # PEFT's TinyLoraConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain
    # class attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.TINYLORA
        super().__post_init__()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        check_layer_selection(self)
        if not self.save_projection:
            warnings.warn(
                "Specified to not save projection tensors P within the state dictionary. They will be restored "
                "using the PRNG key stored in `config.projection_seed`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
        for name in ("r", "u"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"`{name}` should be a positive integer value but the value passed is {value}. "
                                  f"(TinyLoraConfig.{name}: {'the SVD rank, try 2' if name == 'r' else 'try 64'})")
        if not 0.0 <= float(self.weight_tying) <= 1.0:
            raise ConfigError(f"`weight_tying` should be a float between 0.0 and 1.0 but the value passed is "
                              f"{self.weight_tying}. (0.0: a vector per layer, 1.0: one for the whole model)")
        if not 0.0 <= float(self.tinylora_dropout) < 1.0:
            raise ConfigError(f"tinylora_dropout must be in [0, 1), got {self.tinylora_dropout!r}")
        if self.bias not in ("none", "all", "tinylora_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'tinylora_only'")
        if self.init_weights not in (True, False, "uniform"):
            raise ConfigError(f"init_weights={self.init_weights!r} is not one of True, False, 'uniform'")
        if not isinstance(self.projection_seed, int) or isinstance(self.projection_seed, bool):
            raise ConfigError(f"projection_seed must be an integer seed, got {self.projection_seed!r}")
