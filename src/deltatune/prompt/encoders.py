"""The trainable parts of the virtual-token methods: modules that produce the prompt.

Each encoder is called as PEFT's is, ``enc(indices)``: ``indices: (B, n)`` (or ``(n,)``) of virtual-token ids
give ``(B, n, width)`` (or ``(n, width)``), the rows of the prompt table picked by ``indices`` (P-tuning's
LSTM reads them as a sequence). ``enc()`` with no indices returns the whole table ``(n, width)``: row ``i``
is virtual token ``i`` (the same as ``enc(torch.arange(n))``), which is what deltatune's model code uses.

What a file stores is that table, the encoder's *output* (PEFT's ``prompt_embeddings``), so a loaded adapter
needs no reparameterisation network: :meth:`load_prompt_embeddings` turns any encoder into a plain table
holding the file's values. As in PEFT, an encoder built from a config with ``inference_mode=True`` has no
network at all (only ``embedding``, already the output's shape), and skips TEXT/SAMPLE_VOCAB initialisation.
Parameter names are PEFT's (``embedding``, ``mlp_head``, ``lstm_head``, ``transform``), so state dicts match.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.prompt.config import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)

# P-tuning's MLP always has this many hidden linear maps (PEFT's network, whatever encoder_num_layers says).
MLP_HIDDEN_LAYERS = 2


def _required(config: PromptLearningConfig, *names: str) -> None:
    """An encoder built by hand (not by ``get_peft_model``, which fills these from the model) needs them set."""
    missing = [n for n in names if getattr(config, n, None) is None]
    if missing:
        raise ConfigError(
            f"{type(config).__name__} has {', '.join(f'{n}=None' for n in missing)}; an encoder built directly "
            "needs them: pass them to the config (token_dim is the model's hidden size, num_layers its layer "
            "count), or let get_peft_model() fill them from the model"
        )


def _total_virtual_tokens(config: PromptLearningConfig) -> int:
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


class PromptTable(nn.Module):
    """Base: ``n`` rows of width ``dim`` in ``embedding.weight``, and an optional network on top.

    ``forward(indices)`` looks rows up and runs them through :meth:`encode`; ``forward()`` does the same for
    every row in order. Subclasses may put a network on top while training; :meth:`load_prompt_embeddings`
    drops it.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``indices: (B, n)`` or ``(n,)`` -> ``(B, n, width)`` or ``(n, width)``;
        ``None``: all rows, ``(n, width)``."""
        rows = self.embedding.weight if indices is None else self.embedding(indices)
        return self.encode(rows)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """The reparameterisation network, ``(..., n, dim) -> (..., n, width)``; the identity here."""
        return rows

    def prompt_embeddings(self) -> torch.Tensor:
        """The tensor PEFT files as ``prompt_embeddings`` (detached, on the CPU)."""
        with torch.no_grad():
            return self().detach().cpu()

    def load_prompt_embeddings(self, table: torch.Tensor) -> None:
        """Become a plain table holding ``table`` (a file's ``prompt_embeddings``)."""
        self._drop_network()
        if tuple(table.shape) != tuple(self.embedding.weight.shape):
            raise AdapterLoadError(
                f"prompt_embeddings in the file has shape {tuple(table.shape)}, this adapter needs "
                f"{tuple(self.embedding.weight.shape)}: num_virtual_tokens/token_dim/num_layers in "
                "adapter_config.json do not match this model"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(table.to(self.embedding.weight))

    def _drop_network(self) -> None:
        """Remove any reparameterisation network (the file already holds its output)."""


class PromptEmbedding(PromptTable):
    """Prompt tuning's table ``P: (total_virtual_tokens, token_dim)``, initialised per ``prompt_tuning_init``.

    ``forward(indices: (B, n)) -> P[indices]: (B, n, token_dim)``.

    Args:
        config: A :class:`PromptTuningConfig` (or its multitask subclass) with ``token_dim`` set.
        word_embeddings: The model's input embedding, ``E: (vocab, token_dim)`` (used by TEXT and SAMPLE_VOCAB).

    Raises:
        ConfigError: ``num_virtual_tokens``/``token_dim`` unset; a TEXT init whose tokenizer cannot load.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        _required(config, "num_virtual_tokens", "token_dim")
        total = _total_virtual_tokens(config)
        super().__init__(total, config.token_dim)
        init = config.prompt_tuning_init
        if config.inference_mode:
            return  # PEFT skips the init here: the weights come from a file
        if init == "SAMPLE_VOCAB":
            # drawn on the CPU generator, as PEFT does, so a seed picks PEFT's rows on any device
            ids = torch.randint(0, word_embeddings.weight.shape[0], (total,)).to(word_embeddings.weight.device)
            self._copy_rows(word_embeddings, ids)
        elif init == "TEXT":
            ids = _text_token_ids(config)
            ids = (ids * math.ceil(total / len(ids)))[:total]  # repeat the text to fill every row
            self._copy_rows(word_embeddings, torch.tensor(ids, device=word_embeddings.weight.device))

    def _copy_rows(self, word_embeddings: nn.Module, ids: torch.Tensor) -> None:
        with torch.no_grad():
            rows = word_embeddings(ids).detach().float()
        self.embedding.weight = nn.Parameter(rows.to(self.embedding.weight.device))


def _text_token_ids(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a config file must never make us run downloaded code
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"could not load the tokenizer {config.tokenizer_name_or_path!r} for prompt_tuning_init='TEXT' "
            f"({type(exc).__name__}); set tokenizer_name_or_path to a local tokenizer directory"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenises to nothing; give a non-empty text")
    if len(ids) > config.num_virtual_tokens:
        raise ConfigError(
            f"prompt_tuning_init_text is {len(ids)} tokens long but num_virtual_tokens={config.num_virtual_tokens}: "
            f"shorten the text or set num_virtual_tokens >= {len(ids)}"
        )
    return ids


class PromptEncoder(PromptTable):
    """P-tuning: ``P = f(h)`` with trained inputs ``h: (total_virtual_tokens, token_dim)`` and ``f`` PEFT's network:

    * ``MLP``: ``d -> H -> H -> d`` with ReLUs, ``mlp_head = [Linear, ReLU, Linear, ReLU, Linear]``. Exactly two
      hidden maps: ``encoder_num_layers`` is ignored (with PEFT's warning) and so is ``encoder_dropout``.
    * ``LSTM``: a bidirectional ``encoder_num_layers``-layer LSTM ``d -> 2H`` (``lstm_head``, dropout
      ``encoder_dropout`` between its layers), then ``mlp_head = [Linear(2H, 2H), ReLU, Linear(2H, d)]``.

    ``forward(indices: (B, n)) -> f(h[indices]): (B, n, d)``; the LSTM reads each row of ``indices`` as one
    sequence, so ``forward()`` (all rows, in order) equals ``forward(torch.arange(n))``.

    Args:
        config: A :class:`PromptEncoderConfig` with ``token_dim`` set (``encoder_hidden_size`` ``None`` means
            ``token_dim``). With ``inference_mode=True`` no network is built (PEFT's rule).
        word_embeddings: Unused (deltatune's encoders share one signature); PEFT's takes only ``config``.
    """

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Module | None = None) -> None:
        _required(config, "num_virtual_tokens", "token_dim")
        super().__init__(_total_virtual_tokens(config), config.token_dim)
        # PEFT's attribute names, for code that reads them.
        self.token_dim = self.input_size = self.output_size = config.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.total_virtual_tokens = _total_virtual_tokens(config)
        self.encoder_type = config.encoder_reparameterization_type
        d, hidden = self.token_dim, self.hidden_size
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return  # the file holds f's output; nothing to reparameterise
        if self.encoder_type == "LSTM":
            layers = config.encoder_num_layers
            # torch applies LSTM dropout between layers only; 0 for one layer spares its "no effect" warning.
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=hidden, num_layers=layers,
                                     dropout=float(config.encoder_dropout) if layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            if config.encoder_num_layers != MLP_HIDDEN_LAYERS:
                warnings.warn(f"for MLP, the argument `encoder_num_layers` is ignored. Exactly {MLP_HIDDEN_LAYERS} "
                              "MLP layers are used.", UserWarning, stacklevel=2)
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        h = rows                                  # (B, n, d), or (n, d): an unbatched sequence for the LSTM
        if self.lstm_head is not None:
            h = self.lstm_head(h)[0]              # (B, n, 2H): both directions
        return self.mlp_head(h) if self.mlp_head is not None else h

    def _drop_network(self) -> None:
        self.lstm_head = None
        self.mlp_head = None


class PrefixEncoder(PromptTable):
    """Prefix tuning's keys and values, ``(num_virtual_tokens, num_layers * 2 * token_dim)``: row ``i`` holds
    virtual token ``i``'s key and value for every layer, in the order ``[K_0, V_0, K_1, V_1, ...]``, each
    ``token_dim = heads_kv * head_dim`` wide. With ``prefix_projection`` they are ``W_2 tanh(W_1 e)`` of trained
    ``e: (n, token_dim)`` (``transform = [Linear(d, H), Tanh, Linear(H, 2 L d)]``).

    ``forward(prefix: (B, n)) -> (B, n, num_layers * 2 * token_dim)``.

    Args:
        config: A :class:`PrefixTuningConfig` with ``token_dim`` and ``num_layers`` set. With
            ``inference_mode=True`` there is no ``transform`` (PEFT's rule): ``embedding`` holds the keys
            and values themselves.
        word_embeddings: Unused (deltatune's encoders share one signature); PEFT's takes only ``config``.
    """

    def __init__(self, config: PrefixTuningConfig, word_embeddings: nn.Module | None = None) -> None:
        _required(config, "num_virtual_tokens", "token_dim", "num_layers")
        out = config.num_layers * 2 * config.token_dim
        self.prefix_projection = bool(config.prefix_projection)
        if self.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or config.token_dim
            super().__init__(config.num_virtual_tokens, config.token_dim)
            self.transform: nn.Sequential | None = nn.Sequential(
                nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
            last = self.transform[-1]
        else:
            super().__init__(config.num_virtual_tokens, out)
            self.transform = None
            last = self.embedding
        if config.init_weights == "zero":
            for p in last.parameters():
                nn.init.zeros_(p)
        self._out_shape = (config.num_virtual_tokens, out)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return self.transform(rows) if self.transform is not None else rows

    def _drop_network(self) -> None:
        if self.transform is not None:
            self.transform = None
            self.embedding = nn.Embedding(*self._out_shape, device=self.embedding.weight.device)


class MultitaskPromptEmbedding(PromptEmbedding):
    """Multitask prompt tuning: ``P_t = P ⊙ (u_t v_t)`` for each row's task ``t``.

    Shapes: ``P: (n_total, d)``, ``prefix_task_cols: (T, n_total, r)``, ``prefix_task_rows: (T, r, d)``;
    ``forward(indices: (B, n), task_ids: (B,)) -> P[indices] ⊙ (u_t v_t): (B, n, d)`` (PEFT's call);
    ``forward(task_ids=...)`` uses all rows. Its files hold ``P`` itself (not a product) plus both
    factor tensors.
    """

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config, word_embeddings)
        self.num_tasks = config.num_tasks
        total = config.total_virtual_tokens
        # torch.normal as PEFT draws them, so a seed gives PEFT's factors.
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        if config.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
            self._init_from_source(config)

    def forward(self, indices: torch.Tensor | None = None, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ConfigError("multitask prompt tuning needs task_ids: pass task_ids=torch.tensor([...]) with one "
                              f"task index in [0, {self.num_tasks}) per batch row to forward() / generate()")
        rows = self.embedding.weight.unsqueeze(0) if indices is None else self.embedding(indices)  # (1|B, n, d)
        task_matrix = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]  # (B, n, r) @ (B, r, d)
        return rows * task_matrix                                                        # (B, n, d)

    def prompt_embeddings(self) -> torch.Tensor:
        return self.embedding.weight.detach().cpu()  # the shared prompt; the task factors are filed beside it

    def load_prompt_embeddings(self, table: torch.Tensor) -> None:
        PromptTable.load_prompt_embeddings(self, table)

    def load_task_factors(self, cols: torch.Tensor, rows: torch.Tensor) -> None:
        for name, value in (("prefix_task_cols", cols), ("prefix_task_rows", rows)):
            own = getattr(self, name)
            if tuple(value.shape) != tuple(own.shape):
                raise AdapterLoadError(
                    f"{name} in the file has shape {tuple(value.shape)}, this adapter needs {tuple(own.shape)}: "
                    "num_tasks/num_ranks/num_virtual_tokens in adapter_config.json do not match"
                )
            with torch.no_grad():
                own.copy_(value.to(own))

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        state = _read_source_checkpoint(config.prompt_tuning_init_state_dict_path)
        missing = [k for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if k not in state]
        if missing:
            raise ConfigError(f"{config.prompt_tuning_init_state_dict_path} lacks {missing}: it is not a multitask "
                              "prompt tuning checkpoint")
        self.load_prompt_embeddings(state["prompt_embeddings"])
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = state["prefix_task_cols"], state["prefix_task_rows"]  # (T_src, n, r), (T_src, r, d)
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:  # EXACT_SOURCE_TASK
            task = config.prompt_tuning_init_task
            if task is None or not 0 <= task < cols.shape[0]:
                raise ConfigError(f"prompt_tuning_init_task={task!r} is not a task of the source checkpoint, "
                                  f"which has {cols.shape[0]} tasks (0..{cols.shape[0] - 1})")
            cols, rows = cols[task : task + 1], rows[task : task + 1]
        # Every target task starts from the chosen source factors (PEFT requires num_tasks=1 here).
        self.load_task_factors(cols.expand(self.num_tasks, -1, -1), rows.expand(self.num_tasks, -1, -1))


def _read_source_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from deltatune.core.io import load_adapter_weights

    if os.path.isdir(path):
        return load_adapter_weights(path)
    if not os.path.exists(path):
        raise ConfigError(f"prompt_tuning_init_state_dict_path={path!r} does not exist; point it at the source "
                          "task's adapter_model.safetensors")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


ENCODERS: dict[type[PromptLearningConfig], type[PromptTable]] = {
    MultitaskPromptTuningConfig: MultitaskPromptEmbedding,
    PromptTuningConfig: PromptEmbedding,
    PromptEncoderConfig: PromptEncoder,
    PrefixTuningConfig: PrefixEncoder,
}
