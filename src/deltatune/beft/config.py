"""``BeftConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType


@dataclass
class BeftConfig(PeftConfig):
    """BEFT (bias-efficient fine-tuning; Huang et al., 2025, https://arxiv.org/abs/2509.15974): a learned offset
    ``β: (out,)`` added to a frozen layer's output, ``y = W x + b + β``; by default only on the value projections.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (PEFT's table: the attention's value projection, ``v_proj``/``value``/``v``).
            ``nn.Linear`` and, beyond PEFT, GPT-2's ``Conv1D``.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True`` (default): ``β = 0`` (the identity); ``False``: ``β ~ N(0, 1)`` (PEFT discourages it).
    """

    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BEFT
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)  # PEFT's form
