"""Configs of the virtual-token methods, with Hugging Face PEFT's field names, defaults and meaning.

Every method here learns ``num_virtual_tokens`` vectors instead of changing any weight. Soft-prompt
methods (prompt tuning, P-tuning, multitask prompt tuning) put them in front of the input embeddings;
prefix tuning puts per-layer key/value vectors in front of every attention layer's cache.

The model-shaped fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``, ``encoder_hidden_size``) are filled from the model's config by
:func:`fill_from_model` when left ``None``, exactly as PEFT fills them, so the saved
``adapter_config.json`` and tensor shapes are the ones PEFT writes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from deltatune.config import PeftConfig, PeftType, TaskType, _enum_value
from deltatune.errors import ConfigError


class PromptTuningInit(enum.StrEnum):
    """How prompt tuning initialises its virtual tokens."""

    TEXT = "TEXT"                  # the embeddings of a text's tokens (repeated to fill)
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of tokens drawn at random from the vocabulary
    RANDOM = "RANDOM"              # N(0, 1) vectors (may lie off the embedding manifold)


class PromptEncoderReparameterizationType(enum.StrEnum):
    """The network P-tuning passes its virtual tokens through while training."""

    MLP = "MLP"
    LSTM = "LSTM"


class MultitaskPromptTuningInit(enum.StrEnum):
    """How multitask prompt tuning initialises (``*_SOURCE_*`` read a source-task checkpoint)."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"  # shared prompt + the mean of the source tasks' factors
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"        # shared prompt + one source task's factors
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"      # shared prompt only; task factors random


def _positive_int(value: Any, name: str, hint: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; {hint}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every virtual-token method shares.

    Args:
        num_virtual_tokens: How many virtual tokens ``n`` the adapter learns (required, e.g. 20).
        token_dim: Width of a virtual token: the model's hidden size (for prefix tuning on a
            grouped-query-attention model, ``head_dim * num_key_value_heads``, the width of one layer's keys).
        num_transformer_submodules: 1, or 2 for encoder-decoder models (``SEQ_2_SEQ_LM``), where soft-prompt
            methods learn ``2 n`` vectors (PEFT's layout).
        num_attention_heads: Heads of the model (key/value heads for prefix tuning on a GQA model).
        num_layers: Transformer layers of the model.
        modules_to_save: Modules trained in full beside the prompt (e.g. a classifier head).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    # Where the virtual tokens go: False, in front of the input embeddings (prompt/soft.py); True, into every
    # attention layer's key/value cache (prompt/prefix.py: prefix tuning, cartridges). Not a field: never saved.
    feeds_kv_cache: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens", "try num_virtual_tokens=20")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(getattr(self, name), name, "leave it None to take it from the model's config")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules must be 1 or 2 (encoder-decoder), got {self.num_transformer_submodules!r}"
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of a soft prompt: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021): ``n`` trained embedding vectors ``P: (n, d)`` are put in front
    of the input embeddings, ``[P; E(x)]``; the model is frozen.

    Args:
        prompt_tuning_init: ``RANDOM``, ``TEXT`` or ``SAMPLE_VOCAB`` (see :class:`PromptTuningInit`).
        prompt_tuning_init_text: The text whose token embeddings start ``P`` (``TEXT`` only); it is repeated
            to fill ``n`` rows and must not be longer than ``num_virtual_tokens`` tokens.
        tokenizer_name_or_path: Tokenizer that splits ``prompt_tuning_init_text`` (``TEXT`` only).
        tokenizer_kwargs: Extra arguments to ``AutoTokenizer.from_pretrained`` (``TEXT`` only;
            ``trust_remote_code`` is always dropped).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    _init_enum = PromptTuningInit

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        super().__post_init__()
        self.prompt_tuning_init = _enum_value(self._init_enum, self.prompt_tuning_init, "prompt_tuning_init")
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError("When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None: pass "
                                  "tokenizer_name_or_path (a tokenizer directory or hub id) to split "
                                  "prompt_tuning_init_text")
            if not self.prompt_tuning_init_text:
                raise ConfigError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None: pass the "
                                  "text the virtual tokens start from, e.g. 'Classify the topic of this article:'")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021): virtual tokens ``h: (n, d)`` pass through a small network ``f`` while
    training, ``P = f(h)``; only ``P`` is saved, so a loaded adapter is plain prompt tuning.

    ``f`` is PEFT's network: an MLP ``d -> H -> H -> d`` with ReLUs, or a bidirectional LSTM followed by an
    MLP ``2H -> 2H -> d``.

    Args:
        encoder_reparameterization_type: ``MLP`` or ``LSTM``.
        encoder_hidden_size: ``H``; ``None`` uses ``token_dim``.
        encoder_num_layers: Stacked layers of the LSTM. The MLP always has 2 hidden layers (as in PEFT, which
            warns when this is not 2 for ``MLP``).
        encoder_dropout: Dropout between the LSTM's layers (the MLP has none, as in PEFT).
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", "e.g. 128, or None for token_dim")
        _positive_int(self.encoder_num_layers, "encoder_num_layers", "the default is 2")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021): every attention layer ``l`` attends to ``n`` trained keys and values
    ``K_l, V_l: (heads_kv, n, head_dim)`` in front of the sequence's own, i.e. the layer's cache starts
    with them. With ``prefix_projection`` they are produced by an MLP from ``n`` embeddings while
    training, ``[K; V] = W_2 tanh(W_1 e)``; only the result is saved.

    Args:
        prefix_projection: Reparameterise through the MLP (hidden size ``encoder_hidden_size``).
        encoder_hidden_size: Hidden width of that MLP; ``None`` uses ``token_dim``.
        init_weights: ``None`` (random), or ``"zero"``: keys and values start at 0 (PEFT's option).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    feeds_kv_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", "e.g. 128, or None for token_dim")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r}: use None (random) or 'zero'")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning (Wang et al., 2023): a shared prompt ``P: (n, d)`` is scaled elementwise by a
    rank-``r`` task matrix, ``P_t = P ⊙ (u_t v_t)`` with ``u_t: (n, r)`` (``prefix_task_cols``) and
    ``v_t: (r, d)`` (``prefix_task_rows``). ``task_ids`` (one per batch row) pick ``t``.

    Args:
        num_tasks: Number of tasks ``T``.
        num_ranks: Rank ``r`` of each task matrix.
        prompt_tuning_init: ``RANDOM``, ``TEXT``, or initialise from a source-task checkpoint:
            ``AVERAGE_SOURCE_TASKS`` (mean of its task factors), ``EXACT_SOURCE_TASK``
            (task ``prompt_tuning_init_task``'s factors) or ``ONLY_SOURCE_SHARED`` (its shared prompt only).
        prompt_tuning_init_state_dict_path: That checkpoint (an ``adapter_model.safetensors`` or ``.bin``
            written by multitask prompt tuning in either library).
        prompt_tuning_init_task: Source task index for ``EXACT_SOURCE_TASK``.
    """

    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    _init_enum = MultitaskPromptTuningInit

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MULTITASK_PROMPT_TUNING
        _positive_int(self.num_tasks, "num_tasks", "one per task you train on")
        _positive_int(self.num_ranks, "num_ranks", "the default is 1")
        from_source = self.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
        if from_source and not self.prompt_tuning_init_state_dict_path:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init.value!r} reads a source-task checkpoint: set "
                "prompt_tuning_init_state_dict_path to its adapter_model.safetensors"
            )


# ---- filling the model-shaped fields ------------------------------------------------------------
def _first(cfg: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def fill_from_model(config: PromptLearningConfig, model_config: Any,
                    error: type[Exception] = ConfigError) -> PromptLearningConfig:
    """Fill the ``None`` model-shaped fields of ``config`` from a ``transformers`` model config (in place),
    and check the given ones against it.

    The rules are PEFT's, so shapes (and so files) agree: ``token_dim`` is the hidden size,
    ``num_layers`` the layer count, ``num_transformer_submodules`` 2 for ``SEQ_2_SEQ_LM``. For prefix tuning on a
    grouped-query-attention model the prefix must match the *key/value* heads:
    ``token_dim = head_dim * num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``.

    Raises:
        error (``ConfigError``; ``AdapterLoadError`` while loading a file): ``num_virtual_tokens`` missing, a
            field that neither the config nor the model gives, or one that contradicts the model (an adapter
            made for another model).
    """
    if config.num_virtual_tokens is None:
        raise ConfigError(f"{type(config).__name__} needs num_virtual_tokens (how many virtual tokens to learn, "
                          "e.g. num_virtual_tokens=20)")
    cfg: dict[str, Any] = {}
    if model_config is not None:
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        cfg = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim"):
            # attribute_map aliases (T5's num_hidden_layers -> num_layers...) are not in to_dict()
            if cfg.get(name) is None and getattr(text, name, None) is not None:
                cfg[name] = getattr(text, name)

    # What the model says, in PEFT's order of preference.
    derived: dict[str, Any] = {
        "num_layers": _first(cfg, ("num_hidden_layers", "num_layers", "n_layer")),
        "token_dim": _first(cfg, ("hidden_size", "n_embd", "d_model")),
        "num_attention_heads": _first(cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")),
    }
    prefix = config.feeds_kv_cache
    if prefix and cfg.get("num_key_value_heads") is not None and None not in derived.values():
        # Grouped-query attention: the cache holds num_key_value_heads heads, not num_attention_heads.
        head_dim = cfg.get("head_dim") or derived["token_dim"] // derived["num_attention_heads"]
        derived["token_dim"] = head_dim * cfg["num_key_value_heads"]
        derived["num_attention_heads"] = cfg["num_key_value_heads"]
    # Soft prompts only need token_dim to fit; prefixes must fit every layer's keys.
    checked = ("num_layers", "token_dim", "num_attention_heads") if prefix else ("token_dim",)
    for name, value in derived.items():
        given = getattr(config, name)
        if given is None:
            if value is None and name in checked:
                raise error(f"{type(config).__name__}.{name} is not set and the model's config does not give it; "
                            f"pass {name}=... explicitly")
            setattr(config, name, value)  # None stays None for a field this method does not use
        elif value is not None and name in checked and given != value:
            trained = f" (it was made for {config.base_model_name_or_path!r})" if config.base_model_name_or_path else ""
            raise error(f"{type(config).__name__} has {name}={given} but this model needs {name}={value}: the "
                        f"adapter belongs to another model{trained}. Load it into that model, or leave {name}=None")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config
