"""Trainable tokens: new values for a few rows of an embedding matrix, the rest frozen.

For ``E: (vocab, dim)`` and indices ``I = [i_1..i_k]`` the adapter holds ``D: (k, dim)`` (PEFT's name
``trainable_tokens_delta``, though it holds the new rows, not a difference) and the layer computes with
``E' = E`` with rows ``I`` replaced by ``D``: ``y = E'[ids]`` for an embedding, ``y = x E'^T (+ b)`` for an
output layer tied to it. ``D`` starts as ``E[I]``, so the model is unchanged at init. Merging writes ``D``
into ``E`` (the original rows, kept at creation, restore it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.features import in_out_features
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError


class TrainableTokensLayer(AdapterLayer):
    """Wraps ``nn.Embedding`` (or an ``nn.Linear`` output layer that shares its weight).

    Args:
        base_layer: The layer whose weight rows train.
        tied_to: For an output layer tied to the input embedding: the embedding's layer, whose rows this one
            follows (no tensors of its own).
        register_tied: With ``tied_to``: list the shared rows under this layer too in the state dict (PEFT's
            trainable-tokens method files them twice; LoRA's ``trainable_token_indices`` only once).

    Attributes:
        trainable_tokens_delta: ``adapter -> D: (k, dim)``.
        token_indices: ``adapter -> I`` (``k`` ints).
        trainable_tokens_original: ``adapter -> E[I]: (k, dim)``, the rows before training (unmerge writes them
            back). A tied layer shares both with the layer it follows.
    """

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    peft_package = ""  # PEFT's TrainableTokensLayer prints bare
    peft_class_name = "TrainableTokensLayer"

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None,
                 register_tied: bool = True) -> None:
        super().__init__(base_layer)
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule
        # PEFT's public attributes: (num_embeddings, embedding_dim) for an embedding, (in, out) for a tied Linear
        self.in_features, self.out_features = in_out_features(base_layer)
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.originals: dict[str, torch.Tensor] = {}
        else:  # PEFT's tied layers read the leader's settings under the same names
            self.token_indices = tied_to.token_indices
            if register_tied:
                self.trainable_tokens_delta = tied_to.trainable_tokens_delta
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ConfigError(f"trainable tokens adapt nn.Embedding (or a tied nn.Linear output layer), not "
                              f"{type(base_layer).__name__}")

    @property
    def leader(self) -> TrainableTokensLayer:
        """The layer that owns the rows (``self`` unless tied to the input embedding)."""
        return self._tied[0] if self._tied else self

    @property
    def trainable_tokens_original(self) -> dict[str, torch.Tensor]:
        """PEFT's name for the original rows (``adapter -> E[I]: (k, dim)``), kept by the leader."""
        return self.leader.originals

    def _deltas(self) -> nn.ParameterDict:
        return self.leader.trainable_tokens_delta

    def adapter_names(self) -> list[str]:
        return list(self._deltas().keys())

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        if self._tied:  # the leader sets requires_grad of the shared rows
            self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            return
        super().set_adapter(adapter_names, trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        if not self._tied:
            super().delete_adapter(adapter_name)
            self.originals.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Create ``trainable_tokens_delta[adapter_name]``: the current rows ``E[I]`` (or random ones)."""
        if self._tied:
            self.set_adapter(self.leader.active_adapters)
            return
        weight = self.base_layer.weight
        vocab = weight.shape[0]
        bad = [i for i in token_indices if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"token indices {bad} are outside the embedding's {vocab} rows; resize the "
                              "embeddings first (model.resize_token_embeddings) or fix the ids")
        index = torch.tensor(token_indices, device=weight.device)
        originals = weight.detach().index_select(0, index).clone()
        values = originals.clone() if init_weights else torch.randn_like(originals)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
        self._place_adapter(adapter_name)  # fp32 rows over a half-precision embedding (PEFT's autocast)
        self.token_indices[adapter_name] = list(token_indices)
        self.originals[adapter_name] = originals
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the weight with rows replaced ---------------------------------------------------------
    def _check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            rows = set(self.leader.token_indices[name])
            if seen & rows:
                raise ConfigError(f"adapters {names} both replace token rows {sorted(seen & rows)[:5]}; "
                                  "trainable-token adapters used together need disjoint token_indices")
            seen |= rows

    def weight_with(self, names: list[str], weight: torch.Tensor | None = None) -> torch.Tensor:
        """``E'``: ``weight`` (default the base weight) with each adapter's rows written in (differentiable)."""
        w = self.base_layer.weight if weight is None else weight
        for name in names:
            index = torch.tensor(self.leader.token_indices[name], device=w.device)
            w = w.index_copy(0, index, self._deltas()[name].to(w.dtype))
        return w

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``E'[x]`` for an embedding (``x: (..., )`` ids -> ``(..., dim)``), ``x E'^T + b`` for an output layer."""
        active = [a for a in self.active_adapters if a in self._deltas()]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(active)
        w = self.weight_with(active)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) multiply in their forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, w, base.bias)

    # ---- merging -----------------------------------------------------------------------------
    def check_merge(self, adapter_names: list[str] | None = None, where: str = "") -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self._deltas() and n not in self.merged_adapters]
        self._check_disjoint(names)
        for name in names:
            if not torch.isfinite(self._deltas()[name]).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken: its "
                                 f"rows at {where or 'an embedding'} hold NaN/Inf; nothing was merged")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if safe_merge:
            self.check_merge(adapter_names)
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self._deltas() and n not in self.merged_adapters]
        self._check_disjoint(names)
        with torch.no_grad():
            self.base_layer.weight.data = self.weight_with(names, self.base_layer.weight.data)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Write the original rows back (idempotent, so a tied output layer may unmerge the shared weight too)."""
        weight = self.base_layer.weight.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.leader.token_indices[name], device=weight.device)
            weight.index_copy_(0, index, self.leader.originals[name].to(weight))


def supported_types() -> tuple[type, ...]:
    return (nn.Embedding, nn.Linear)


def input_embedding_name(model: nn.Module) -> str | None:
    """The full module name of ``model.get_input_embeddings()`` (looking through adapter wrappers)."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None:
        return None
    for name, module in model.named_modules():
        if module is emb or getattr(module, "base_layer", None) is emb:
            return name
    return None


def tied_output_names(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Names of output layers that share ``embedding``'s weight tensor (tied word embeddings)."""
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return []
    out = []
    for name, module in model.named_modules():
        if module is embedding or isinstance(module, AdapterLayer) or name.endswith(".base_layer"):
            continue
        if isinstance(module, nn.Linear) and module.weight is weight:
            out.append(name)
    return out
