"""``RoadConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError

VARIANTS = ("road_1", "road_2", "road_4")


@dataclass
class RoadConfig(PeftConfig):
    """RoAd (Liao et al., 2024, "RoAd: 2D Rotary Adaptation", https://huggingface.co/papers/2409.00119): the
    output ``h = W x + b`` of a layer is cut into pairs of features and each pair is turned and scaled by its own
    learned 2x2 matrix, ``z = R h`` with ``R`` block-diagonal (see ``deltatune.road.layer`` for the equation).

    Args:
        variant: How many numbers describe each 2x2 matrix ``[[α cos θ, −α sin θ], [α sin θ, α cos θ]]``:
            ``"road_1"`` (default): one ``(θ, α)`` per pair, ``out/2`` of each per layer; ``"road_2"``: one per
            output feature (the two rows of a pair differ), ``out`` of each; ``"road_4"``: two per output feature
            (the cosine and the sine terms each have their own angle and scale), ``2·out`` of each.
        group_size: The output features are cut into groups of this many, and within a group feature ``i`` is
            paired with feature ``i + group_size/2``. It changes only the layout (the features are unordered), not
            the model's quality; larger groups run faster in vLLM's kernels. Must be even and divide the output
            size of every adapted layer (``deltatune train`` picks the largest even divisor up to 64 for its model).
        init_weights: ``True`` (default): ``θ = 0``, ``α = 1`` (the identity); ``False``: ``θ ~ N(0, 0.5²)``,
            ``α ~ N(1, 0.5²)`` (for tests).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). ``nn.Linear`` (also bitsandbytes 4/8-bit) and, beyond
            PEFT, GPT-2's ``Conv1D``.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ROAD
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)  # PEFT's form
        if self.variant not in VARIANTS:  # PEFT's sentences first
            raise ConfigError(f"Invalid variant {self.variant} specified. Please choose from road_1, road_2 or road_4")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 2 != 0:
            raise ConfigError(f"The group_size must be divisible by 2 when using RoadLayer, but got {self.group_size}. "
                              "(features are paired within a group: use a positive even size, e.g. 64)")
