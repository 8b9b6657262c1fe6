"""``TrainableTokensConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: train only chosen rows of the embedding matrix (new or re-trained tokens).

    Args:
        token_indices: The vocabulary indices whose embedding rows train. With tied input/output embeddings the
            output layer's rows follow (one tensor, as in the base model). The default (empty) builds a config,
            as PEFT's does, so generic code can make one and fill the ids in; applying it to a model without ids
            raises :class:`~deltatune.errors.ConfigError`.
        target_modules: The embedding layer(s): names/suffixes or a regex string (full match). ``None`` picks
            the model's input embedding (``get_input_embeddings()``), filled in as its full name (PEFT's rule).
        init_weights: ``True`` starts the rows as copies of the current embeddings (identity); ``False``
            draws them at random (for tests).
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    # Not fields of PEFT's config; the shared targeting reads them.
    exclude_modules = None
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.TRAINABLE_TOKENS
        super().__post_init__()
        # Empty is the (PEFT) default: refused when the config is applied (``check_applicable``), not here.
        if isinstance(self.token_indices, (list, tuple)) and not self.token_indices:
            self.token_indices = []
            return
        check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        self.token_indices = [int(i) for i in self.token_indices]

    def check_applicable(self) -> None:
        """Raise :class:`ConfigError` unless ``token_indices`` names rows to train (called when the config is
        applied to a model: ``get_peft_model``, ``add_adapter``, loading)."""
        if not self.token_indices:
            raise ConfigError("TrainableTokensConfig.token_indices is empty: nothing to train; pass the ids of the "
                              "tokens to train, e.g. TrainableTokensConfig(token_indices=[32000, 32001])")
        check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")


def check_token_indices(indices, what: str) -> None:
    """Raise :class:`ConfigError` unless ``indices`` is a non-empty list of distinct non-negative ints."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ConfigError(f"{what} must be a non-empty list of token ids (e.g. [32000, 32001]), got {indices!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ConfigError(f"{what} must hold non-negative integer token ids, got {indices!r}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{what} lists a token id twice: {indices!r}; list each once")
