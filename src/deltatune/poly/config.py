"""``PolyConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PolyConfig(PeftConfig):
    """Polytropon (Poly; Ponti et al., 2022) and Multi-Head Routing (MHR; Caccia et al., 2022): every adapted
    layer holds an inventory of ``n_skills`` LoRA modules ("skills"), and a learned per-task routing picks a
    mixture of them for each row of a batch from that row's task id, ``y = W x + (1/r) · x A_t B_t`` with
    ``A_t = Σ_s w_{t,s} A_s``, ``B_t = Σ_s w_{t,s} B_s``. With ``n_splits > 1`` (MHR) the input and output
    features are cut into ``n_splits`` blocks, each routed on its own.

    Every forward and ``generate`` call needs ``task_ids`` (one task id per batch row).

    Args:
        r: Rank of each skill's LoRA factors.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``B = 0`` (the adapter starts as the identity); ``False``: ``B`` drawn as ``A``
            (Kaiming-uniform, tests). ``A`` is always Kaiming-uniform, the router logits ``U(-1e-3, 1e-3)``.
        poly_type: The router; PEFT has one, ``"poly"``.
        n_tasks: Number of tasks (rows of the router's logits); task ids run from 0 to ``n_tasks - 1``.
        n_skills: Number of LoRA skills in each layer's inventory.
        n_splits: Number of blocks the features are split into; ``> 1`` is Multi-Head Routing (it must divide
            each adapted layer's input and output features).
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def __post_init__(self) -> None:
        self.peft_type = PeftType.POLY
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):  # PEFT's form: a set
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if not _positive_int(self.r):  # PEFT's sentence (its layer raises it)
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}")
        for name in ("n_tasks", "n_skills", "n_splits"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"PolyConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.poly_type != "poly":  # PEFT's sentence first (it raises it when the router is built)
            raise ConfigError(f"Unsupported poly_type: {self.poly_type}. Currently, only the following types are "
                              "supported: `poly`.")

    @property
    def merge_refusal(self) -> str:
        """Why the adapter cannot be merged (read by ``AdapterModel.check_mergeable``)."""
        return ("its mixture of LoRA skills is chosen per row by the task id, so no single weight holds it (PEFT "
                "cannot merge Poly either)")
