"""``GloraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError

# What each matrix may be (PEFT's sets): A and B act on the weight, C couples it to the bias, D and E act on it
CHOICES_A_B = ("constant", "lora", "none", "vector")
CHOICES_C = ("lora", "none", "vector")
CHOICES_D_E = ("constant", "none", "vector")


@dataclass
class GloraConfig(PeftConfig):
    """Generalized LoRA (GLoRA; Chavan et al., 2023, https://arxiv.org/abs/2306.07967): for a frozen linear layer
    ``W0: (out, in)``, ``b0: (out,)``::

        W_eff = W0 + W0 ⊙ A + B
        b_eff = b0 + b0 ⊙ D + E + W0 C

    with each of ``A, B, C, D, E`` parametrised on its own (``"lora"``: ``Xd Xu``, rank ``r``; ``"vector"``: one
    value per output (a column broadcast over the row; for ``C`` one per input); ``"constant"``: one scalar;
    ``"none"``: zeros, nothing trains). ``C, D, E`` exist only where the layer has a bias.

    Args:
        r: Rank of every ``"lora"`` matrix (``A, B: (out, r) (r, in)``; ``C: (in, r) (r, 1)``).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"glora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        config_A_B: ``A`` and ``B``: ``"lora"`` (default), ``"vector"`` (``(out, 1)``), ``"constant"`` or ``"none"``.
        config_C: ``C: (in, 1)``: ``"lora"`` (default), ``"vector"`` or ``"none"``.
        config_D_E: ``D`` and ``E``: ``"constant"`` (default), ``"vector"`` (``(out,)``) or ``"none"``.
        init_weights: ``True``: the adapter starts as the identity (the ``Xd`` of ``"lora"`` matrices, vectors and
            constants zero; ``Xu`` He-uniform); ``False``: He-uniform everywhere, constants ``N(0, 0.02²)`` (tests).
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.GLORA
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        for name, choices in (("config_A_B", CHOICES_A_B), ("config_C", CHOICES_C), ("config_D_E", CHOICES_D_E)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"Invalid {name} value: {value!r}. Valid values are: {', '.join(choices)}.")
        uses_rank = "lora" in (self.config_A_B, self.config_C)
        if uses_rank and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ConfigError(f"GloraConfig.r must be a positive integer for a 'lora' matrix, got {self.r!r}; try r=8")
        if self.bias not in ("none", "all", "glora_only"):  # PEFT's sentence (it refuses when the model is built)
            raise ConfigError(f"Requested bias: {self.bias}, is not implemented. Use 'none', 'all' or 'glora_only'")
