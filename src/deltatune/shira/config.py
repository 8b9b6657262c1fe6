"""``ShiraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError
from deltatune.shira.mask_functions import random_mask


@dataclass
class ShiraConfig(PeftConfig):
    """Sparse high-rank adapters (SHiRA; Bhardwaj et al., 2024): train ``K = r · (out + in)`` entries of ``W:
    (out, in)`` at fixed positions, ``ΔW = s · scatter(indices, values)``, a sparse update whose rank is not
    bounded by ``r`` (``r`` only sets the count, a rank-``r`` LoRA's).

    Args:
        r: Sets the number of trained values per layer, ``r · (out + in)``; must leave it at most ``out · in``.
        mask_type: ``"random"``: positions drawn from ``random_seed``
            (:func:`deltatune.shira.mask_functions.random_mask`). Any other name means a mask function of your
            own: set ``config.mask_fn = fn`` with ``fn(base_layer, r, **kwargs) -> mask: (out, in)`` of zeros and
            ``r · (out + in)`` ones, on the base weight's device.
        random_seed: Seed of the random mask's generator (``None``: torch's default seed, also reproducible).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default. Linear layers (and GPT-2's ``Conv1D``, which PEFT does not adapt) only.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        init_weights: ``True``: the values start at zero (the model is unchanged); ``False``: ``N(0, 1)`` (tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).

    Attributes:
        mask_fn: The mask function (not a field: not written to ``adapter_config.json``); ``random_mask`` for
            ``mask_type="random"``, else ``None`` until you set one (a loaded adapter takes its positions from the
            file and needs none).
    """

    r: int = 32
    mask_type: Literal["random"] = "random"
    random_seed: int | None = None
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    # PEFT's ShiraConfig has none of these; the shared targeting reads them, so they exist as plain class
    # attributes (not fields: they must not appear in adapter_config.json).
    exclude_modules = None
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.SHIRA
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool):
            raise ConfigError(f"ShiraConfig.r must be an integer, got {self.r!r}; try r=32")
        if self.random_seed is not None and (not isinstance(self.random_seed, int) or isinstance(self.random_seed,
                                                                                                 bool)):
            raise ConfigError(f"ShiraConfig.random_seed must be an integer or None, got {self.random_seed!r}")
        self.mask_fn: Callable[..., torch.Tensor] | None
        if self.mask_type == "random":
            self.mask_fn = random_mask
        else:
            if not self.inference_mode:  # PEFT's warning, verbatim
                warnings.warn(
                    f"Argument self.mask_type={self.mask_type!r} is not recognized, please supply your own masking "
                    "function by calling `config.mask_fn = my_mask_fn`.",
                    stacklevel=3,
                )
            self.mask_fn = None
