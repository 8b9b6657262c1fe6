"""``BottleneckConfig``: bottleneck adapters (deltatune's own method; PEFT has none, so only deltatune reads
its files, which use the same names: ``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError

# Where the sub-layers' outputs are, by ``model.config.model_type``: the attention output projection
# ("attn") and the whole feed-forward block or its output projection ("ffn").
DEFAULT_BOTTLENECK_TARGETS: dict[str, dict[str, str]] = {
    "llama": {"attn": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp"},
    "mistral": {"attn": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp"},
    "qwen2": {"attn": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp"},
    "qwen3": {"attn": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp"},
    "gemma": {"attn": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp"},
    "gpt2": {"attn": r".*\.attn\.c_proj", "ffn": r".*\.mlp"},
    "bert": {"attn": r".*\.attention\.output\.dense", "ffn": r".*\.layer\.\d+\.output\.dense"},
    "roberta": {"attn": r".*\.attention\.output\.dense", "ffn": r".*\.layer\.\d+\.output\.dense"},
}
NON_LINEARITIES = ("relu", "gelu", "silu", "swish", "tanh")
LOCATIONS = ("attn", "ffn")


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020; parallel: He et al., 2022).

    A small MLP ``A(h) = s · W_up f(W_down h)`` (``W_down: (m, d)``, ``W_up: (d_out, m)``, ``m = d_out //
    reduction_factor``) placed on a sub-layer's output:

    - sequential (Houlsby/Pfeiffer): ``y = h + A(h)`` with ``h = sublayer(x)``;
    - parallel (He et al.): ``y = sublayer(x) + A(x)``.

    ``W_up`` starts at zero, so the model is unchanged at init. ``f`` makes the update non-linear: the adapter
    cannot be merged into the weights.

    Args:
        target_modules: The sub-layers to adapt (names/suffixes or a regex string); ``None`` picks the
            architecture's attention output and/or feed-forward block, as ``locations`` says.
        locations: ``["ffn"]`` (Pfeiffer: after the feed-forward block), ``["attn", "ffn"]`` (Houlsby: after
            both) or ``["attn"]``; used when ``target_modules`` is ``None``.
        parallel: ``True`` for the parallel placement (the adapter reads the sub-layer's input).
        reduction_factor: ``d_out / m``, the bottleneck's width ratio (Pfeiffer's default 16).
        non_linearity: ``f``: one of relu, gelu, silu (swish), tanh.
        scaling: ``s``, the adapter output's scale (1 for sequential adapters; He et al. use 4 for parallel).
        init_weights: ``True``: ``W_up = 0`` (identity); ``False``: random ``W_up`` (for tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    locations: list[str] = field(default_factory=lambda: ["ffn"])
    parallel: bool = False
    reduction_factor: int = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    layers_to_transform = None
    layers_pattern = None
    merge_refusal = ("a bottleneck adapter adds s·W_up f(W_down h), a non-linear function of the activations, "
                     "which no change of the base weights reproduces")

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOTTLENECK
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if isinstance(self.locations, str):
            self.locations = [self.locations]
        bad = [loc for loc in self.locations if loc not in LOCATIONS]
        if bad or not self.locations:
            raise ConfigError(f"BottleneckConfig.locations={self.locations!r}: use a non-empty list of {LOCATIONS}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be a positive integer (16 is usual), "
                              f"got {self.reduction_factor!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"non_linearity={self.non_linearity!r} is not one of {NON_LINEARITIES}")
