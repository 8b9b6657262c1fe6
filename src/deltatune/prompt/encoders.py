"""The trainable parts of the virtual-token methods: modules that produce the prompt.

Each encoder's ``forward`` returns the whole prompt table at once (no token indices: virtual token ``i`` is
row ``i``). What a file stores is that table, the encoder's *output* (PEFT's ``prompt_embeddings``), so a
loaded adapter needs no reparameterisation network: :meth:`load_prompt_embeddings` turns any encoder into
a plain table holding the file's values.
"""

from __future__ import annotations

import math
import os

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


class PromptTable(nn.Module):
    """Base: ``n`` rows of width ``dim`` in ``embedding.weight``; ``forward()`` returns them, ``(n, dim)``.

    Subclasses may put a network on top while training; :meth:`load_prompt_embeddings` drops it.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

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

    Args:
        config: A filled :class:`PromptTuningConfig` (or its multitask subclass).
        word_embeddings: The model's input embedding, ``E: (vocab, token_dim)`` (used by TEXT and SAMPLE_VOCAB).
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        total = config.total_virtual_tokens
        super().__init__(total, config.token_dim)
        init = config.prompt_tuning_init
        if init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.weight.shape[0], (total,), device=word_embeddings.weight.device)
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
    """P-tuning: ``P = f(h)`` with trained inputs ``h: (total_virtual_tokens, token_dim)`` and ``f`` an MLP or a
    bidirectional LSTM + MLP (see :class:`PromptEncoderConfig`). Shapes: ``f: (n, d) -> (n, d)``."""

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__(config.total_virtual_tokens, config.token_dim)
        d, hidden, p = config.token_dim, config.encoder_hidden_size, float(config.encoder_dropout)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=p if config.encoder_num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head: nn.Sequential | None = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            widths = [d] + [hidden] * config.encoder_num_layers
            layers: list[nn.Module] = []
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(w_in, w_out), nn.ReLU()] + ([nn.Dropout(p)] if p > 0 else [])
            self.mlp_head = nn.Sequential(*layers, nn.Linear(hidden, d))

    def forward(self) -> torch.Tensor:
        h = self.embedding.weight                              # (n, d)
        if self.lstm_head is not None:
            h = self.lstm_head(h.unsqueeze(0))[0].squeeze(0)   # (n, 2H): both directions
        return self.mlp_head(h) if self.mlp_head is not None else h

    def _drop_network(self) -> None:
        self.lstm_head = None
        self.mlp_head = None


class PrefixEncoder(PromptTable):
    """Prefix tuning's keys and values, ``(num_virtual_tokens, num_layers * 2 * token_dim)``: row ``i`` holds
    virtual token ``i``'s key and value for every layer, in the order ``[K_0, V_0, K_1, V_1, ...]``, each
    ``token_dim = heads_kv * head_dim`` wide. With ``prefix_projection`` they are ``W_2 tanh(W_1 e)`` of trained
    ``e: (n, token_dim)``."""

    def __init__(self, config: PrefixTuningConfig, word_embeddings: nn.Module | None = None) -> None:
        out = config.num_layers * 2 * config.token_dim
        self.prefix_projection = bool(config.prefix_projection)
        if self.prefix_projection:
            super().__init__(config.num_virtual_tokens, config.token_dim)
            self.transform: nn.Sequential | None = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out))
            last = self.transform[-1]
        else:
            super().__init__(config.num_virtual_tokens, out)
            self.transform = None
            last = self.embedding
        if config.init_weights == "zero":
            for p in last.parameters():
                nn.init.zeros_(p)
        self._out_shape = (config.num_virtual_tokens, out)

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        return self.transform(e) if self.transform is not None else e

    def _drop_network(self) -> None:
        if self.transform is not None:
            self.transform = None
            self.embedding = nn.Embedding(*self._out_shape, device=self.embedding.weight.device)


class MultitaskPromptEmbedding(PromptEmbedding):
    """Multitask prompt tuning: ``P_t = P ⊙ (u_t v_t)`` for each row's task ``t``.

    Shapes: ``P: (n_total, d)``, ``prefix_task_cols: (T, n_total, r)``, ``prefix_task_rows: (T, r, d)``;
    ``forward(task_ids: (B,)) -> (B, n_total, d)``. Its files hold ``P`` itself (not a product) plus both
    factor tensors.
    """

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config, word_embeddings)
        self.num_tasks = config.num_tasks
        total = config.total_virtual_tokens
        self.prefix_task_cols = nn.Parameter(torch.randn(config.num_tasks, total, config.num_ranks) * 0.02)
        self.prefix_task_rows = nn.Parameter(torch.randn(config.num_tasks, config.num_ranks, config.token_dim) * 0.02)
        if config.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
            self._init_from_source(config)

    def forward(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ConfigError("multitask prompt tuning needs task_ids: pass task_ids=torch.tensor([...]) with one "
                              f"task index in [0, {self.num_tasks}) per batch row to forward() / generate()")
        task_matrix = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]  # (B, n, r) @ (B, r, d)
        return self.embedding.weight.unsqueeze(0) * task_matrix                          # (B, n, d)

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
