"""``OFTConfig``: Hugging Face PEFT 0.21's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


def check_layer_selection(config: PeftConfig) -> None:
    """Checks every method with ``layers_to_transform`` shares (PEFT's rules)."""
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                          "(layers_pattern only names where the layer index is; set both or neither)")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ConfigError(
            "`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer indices "
            "into the regex, or pass target_modules as a list of names"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class OFTConfig(PeftConfig):
    """Orthogonal fine-tuning (Qiu et al., 2023): the frozen weight is rotated, ``W' = W Rᵀ``, by a trained
    block-diagonal orthogonal ``R`` (``r`` blocks of ``oft_block_size x oft_block_size``), so the angles between
    neurons - the "hyperspherical energy" - are kept. Each block is the Cayley transform of a skew-symmetric
    ``Q`` (only its upper triangle is stored); ``Q = 0`` at init, so the model starts unchanged.

    Give exactly one of ``r`` (blocks per layer) and ``oft_block_size`` (PEFT's rule; ``r x oft_block_size`` is
    the layer's input size). A value that does not divide a layer's input size is moved to the nearest one that
    does, for that layer, with a warning (as PEFT does, so files cross).

    Args:
        r: Number of blocks per layer; ``0`` to use ``oft_block_size``.
        oft_block_size: Block size; ``0`` to use ``r``. Default 32.
        module_dropout: Training only: this share of the blocks is replaced by the identity per step
            (multiplicative dropout).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default (LoRA's table, as PEFT).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` or ``"oft_only"`` (train the adapted layers' biases).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        init_weights: ``True``: ``Q = 0`` (identity); ``False``: ``Q ~ N(0, 0.1²)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        coft: Constrained OFT: before each use, every block's ``Q`` is projected into the Frobenius ball of
            radius ``eps / sqrt(blocks)`` (in place), which bounds how far ``R`` can move from ``I``.
        eps: COFT's radius (only with ``coft=True``).
        block_share: One block shared by all ``r`` positions (``b(b-1)/2`` parameters per layer).
        use_cayley_neumann: Approximate ``(I + Q)(I - Q)⁻¹`` by a truncated Neumann series (no matrix solve;
            nearly orthogonal for small ``Q``); ``False`` uses the exact Cayley transform ``(I - Q)(I + Q)⁻¹``.
        num_cayley_neumann_terms: Terms of that series.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        self.peft_type = PeftType.OFT
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        check_layer_selection(self)
        if not _is_count(self.r) or not _is_count(self.oft_block_size):
            raise ConfigError(f"OFTConfig: r and oft_block_size must be integers >= 0, got r={self.r!r}, "
                              f"oft_block_size={self.oft_block_size!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFTConfig: give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}), the other 0 "
                "(r x oft_block_size is the layer's input size); e.g. OFTConfig(oft_block_size=32) or "
                "OFTConfig(r=8, oft_block_size=0)"
            )
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if self.bias not in ("none", "all", "oft_only"):
            raise ConfigError(f"OFTConfig.bias={self.bias!r}; use 'none', 'all' or 'oft_only'")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"OFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if not _is_count(self.num_cayley_neumann_terms) or self.num_cayley_neumann_terms < 1:
            raise ConfigError("OFTConfig.num_cayley_neumann_terms must be a positive integer, got "
                              f"{self.num_cayley_neumann_terms!r}")
        if self.coft and not float(self.eps) > 0:
            raise ConfigError(f"OFTConfig.eps must be positive with coft=True, got {self.eps!r}")

    @classmethod
    def from_dict(cls, data: dict) -> OFTConfig:
        """As the base, but refuses the OFT format of PEFT < 0.14 (no ``oft_block_size``; other tensors), as PEFT."""
        if "oft_block_size" not in data:
            raise ConfigError(
                "this OFT adapter_config.json has no oft_block_size: it was written by PEFT < 0.14, whose OFT "
                "tensors mean something else; retrain the adapter with PEFT >= 0.14 or deltatune"
            )
        return super().from_dict(data)
