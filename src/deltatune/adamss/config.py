"""``AdamssConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class AdamssConfig(PeftConfig):
    """AdaMSS, adaptive multi-subspaces (PEFT's ``AdamssConfig``): each adapted ``W: (out, in)`` (its bias as one more
    input column) is split by a truncated SVD ``W ≈ U S V`` of rank ``R = min(r, out, in(+1))``; the ``out`` rows of
    ``U`` are clustered (K-means) into ``K = num_subspaces`` groups, and group ``k`` (output rows ``S_k``) learns
    ``ΔW[S_k] = B_k A_k V`` with ``B_k: (|S_k|, r_k)``, ``A_k: (r_k, R)`` trained and ``V: (R, in(+1))`` frozen.
    See :mod:`deltatune.adamss.layer` for the equations and shapes.

    Args:
        r: Rank ``R`` of the truncated SVD (clamped to ``min(out, in(+1))``).
        num_subspaces: ``K``, clusters of output rows (clamped to ``out``); each has its own ``(A_k, B_k)``.
        subspace_rank: ``r_k`` of each subspace (``min(|S_k|, subspace_rank)``; at least 1).
        target_modules: Names/suffixes or a regex string (full match); ``None`` picks the architecture's default
            (LoRA's table, plus ViT's query/value: PEFT's).
        init_weights: ``"orthogonal"``: ``A_k`` from a QR of the subspace's singular directions, ``B_k = 0`` (the
            identity at init); ``None`` (or ``False``): ``B_k ~ 0.01 N(0, 1)`` (tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        use_asa: Adaptive subspace allocation: during training, keep only the most important subspaces
            trainable (see :mod:`deltatune.adamss.asa`); driven by ``update_and_allocate`` (the deltatune trainer,
            or :class:`deltatune.adamss.asa_callback.AdamssAsaCallback` in a ``transformers.Trainer``).
        asa_target_subspaces: Subspaces left trainable, over all layers, once the schedule ends.
        init_warmup, final_warmup: The steps between which importance is measured and subspaces are pruned.
        mask_interval: Steps between two prunings.
        asa_importance_beta, asa_uncertainty_beta: EMA factors of the importance ``|p ⊙ ∇p|`` and of its
            uncertainty.
        asa_schedule_exponent: ``e`` of the schedule ``target + (total - target) · (1 - progress)^e``.
        use_dynamic_rank: ``r_k`` = number of singular values of the subspace's Gram matrix above
            ``svd_threshold ·`` its largest (at most ``subspace_rank``).
        svd_threshold: See ``use_dynamic_rank``.
        random_seed: Seed of the randomised SVD (so a saved adapter is rebuilt identically on load).
    """

    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    target_modules: list[str] | set[str] | str | None = None
    init_weights: str | None = "orthogonal"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = field(default=0)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAMSS
        super().__post_init__()
        check_layer_selection(self)
        if self.init_weights is False:  # PEFT's backward compatibility: False means None
            self.init_weights = None
        if self.init_weights not in ("orthogonal", None):
            raise ConfigError(f"init_weights must be 'orthogonal' or None, got {self.init_weights}")
        for name in ("r", "num_subspaces", "subspace_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"AdamssConfig.{name} must be a positive integer, got {value!r}")
        if self.use_asa:  # PEFT's checks, its sentences first
            if self.mask_interval <= 0:
                raise ConfigError(f"`mask_interval` must be a positive integer when `use_asa=True`, got "
                                  f"{self.mask_interval}.")
            if self.init_warmup >= self.final_warmup:
                raise ConfigError(
                    "`init_warmup` must be smaller than `final_warmup` when `use_asa=True` so that ASA has a "
                    f"non-empty pruning ramp, got init_warmup={self.init_warmup} and "
                    f"final_warmup={self.final_warmup}."
                )
            if self.asa_target_subspaces <= 0:
                raise ConfigError("`asa_target_subspaces` must be a positive integer when `use_asa=True`, got "
                                  f"{self.asa_target_subspaces}.")
            if self.asa_schedule_exponent <= 0:
                raise ConfigError("`asa_schedule_exponent` must be a positive number when `use_asa=True`, got "
                                  f"{self.asa_schedule_exponent}.")
