"""``BOFTConfig``: Hugging Face PEFT 0.21's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError
from deltatune.oft.config import check_layer_selection


@dataclass
class BOFTConfig(PeftConfig):
    """Butterfly orthogonal fine-tuning (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via
    Butterfly Factorization"): OFT's rotation written as a product of ``m = boft_n_butterfly_factor`` sparse
    orthogonal factors, each a block-diagonal of Cayley blocks between butterfly permutations, so a few small
    blocks mix all input features; plus a trained per-output scale ``s``::

        R = B_(m-1) ··· B_1 B_0,   B_i = P_i diag(R_i1, ..., R_iD) P_iᵀ,   y = s ⊙ (W (x R)) + b  (x a row)

    ``m = 1`` is OFT with blocks of ``boft_block_size``. Give exactly one of ``boft_block_size`` and
    ``boft_block_num`` (``size x num`` = the layer's input size).

    Args:
        boft_block_size: Block size ``b`` (default 4); ``0`` to use ``boft_block_num``.
        boft_block_num: Blocks per factor ``D``; ``0`` to use ``boft_block_size``.
        boft_n_butterfly_factor: Number of butterfly factors ``m`` (1: plain OFT).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default (LoRA's table, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        boft_dropout: Training only: in one randomly chosen factor, this share of the blocks becomes ``I``.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` or ``"boft_only"``.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``R_i = I`` and ``s = 1`` (identity); ``False``: random (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOFT
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        check_layer_selection(self)
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"BOFTConfig.{name} must be an integer >= 0, got {value!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"BOFTConfig: give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}), the other 0 (size x num is the layer's input size); e.g. "
                "BOFTConfig(boft_block_size=8) or BOFTConfig(boft_block_size=0, boft_block_num=16)"
            )
        m = self.boft_n_butterfly_factor
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ConfigError(f"BOFTConfig.boft_n_butterfly_factor must be a positive integer, got {m!r}")
        if not 0.0 <= float(self.boft_dropout) < 1.0:
            raise ConfigError(f"BOFTConfig.boft_dropout must be in [0, 1), got {self.boft_dropout!r}")
        if self.bias not in ("none", "all", "boft_only"):
            raise ConfigError(f"BOFTConfig.bias={self.bias!r}; use 'none', 'all' or 'boft_only'")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r}")
