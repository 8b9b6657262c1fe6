"""Activated LoRA (aLoRA; Greenewald et al., 2025, arXiv:2504.12397): the adapter acts only from its invocation on.

An aLoRA adapter (``LoraConfig.alora_invocation_tokens``, the tokenised invocation string) changes a token's
computation only from the *last* occurrence of the invocation sequence in its row onwards::

    y_t = W x_t + b                       t <  start   (the base model, exactly)
    y_t = W x_t + b + s · B A x_t         t >= start   (ordinary LoRA)

Attention is causal, so every hidden state before ``start`` is the base model's: the base model's KV cache of
the prompt before the invocation can be reused as is, and several aLoRA adapters can share it. A row without the
invocation runs the base model throughout.

Offsets follow PEFT's convention: ``offset = T - start`` counts from the *end* of the ``T`` input ids (``None``
where the invocation is absent). A layer that sees ``T'`` positions adapts the last ``min(offset, T')`` of them,
so the same offsets stay right when ``generate()`` feeds only the tokens the cache lacks: a decoding step
(``T' = 1``) adapts its token in every row that has the invocation, and a prefill that starts after a reused
cache adapts what it should whether the invocation lies in the cached part or not.

aLoRA is a LoRA variant (:class:`Alora`, :mod:`deltatune.lora.variants`; the layer flag ``use_alora``, asked for
by a non-empty ``alora_invocation_tokens``). ``PeftModel.forward``/``generate`` compute the offsets from
``input_ids`` (:func:`activated`) and leave them on every layer holding an aLoRA adapter (``layer.alora_offsets``)
for the call; the layer runs its other active adapters first (``after_others``: a plain adapter keeps its fused
node), then each aLoRA adapter adds its masked update (:func:`masked_delta`). A layer called with no offsets (the
inner model called directly) runs the base for its aLoRA adapters, as PEFT does.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import PeftWarning
from deltatune.errors import ConfigError
from deltatune.lora.layer import LoraLinear
from deltatune.lora.variants import LoraVariant

MERGE_REFUSAL = ("aLoRA (alora_invocation_tokens) adapts only the tokens from the invocation on, so it is not a "
                 "change of the base weights")


def check_config(config: Any) -> None:
    """Validate ``config.alora_invocation_tokens`` (a non-empty list of token ids) and what aLoRA cannot combine
    with; normalises a tuple to a list. PEFT warns for task types other than ``CAUSAL_LM``; so does this."""
    tokens = config.alora_invocation_tokens
    if isinstance(tokens, tuple):
        tokens = config.alora_invocation_tokens = list(tokens)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in tokens):
        raise ConfigError(f"alora_invocation_tokens={tokens!r} must be a list of token ids (non-negative ints), "
                          "e.g. tokenizer.encode(invocation_string, add_special_tokens=False)")
    if not tokens:  # PEFT treats an empty list as no aLoRA: the adapter is plain LoRA
        return
    if config.use_dora:
        raise ConfigError("aLoRA (alora_invocation_tokens) cannot be combined with DoRA (use_dora=True), as in PEFT; "
                          "drop one of them")
    if config.target_parameters:
        raise ConfigError("aLoRA (alora_invocation_tokens) adapts Linear layers only, not target_parameters; "
                          "target the Linear modules with target_modules")
    if str(config.task_type) != "CAUSAL_LM":
        warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", PeftWarning, stacklevel=4)


@dataclass(frozen=True)
class Offsets:
    """One aLoRA adapter's offsets for a batch of ``len(rows)`` rows.

    ``rows: (batch,)`` int64 on the model's device: ``T - start`` per row, 0 where the invocation is absent (PEFT's
    ``None``). ``shortest``/``longest`` are their min/max, kept on the host so that layers slice without a sync.
    """

    rows: torch.Tensor
    shortest: int
    longest: int

    @classmethod
    def from_list(cls, values: Sequence[int | None], device: torch.device) -> Offsets:
        ints = [0 if v is None else int(v) for v in values]
        if any(v < 0 for v in ints):
            raise ConfigError(f"alora_offsets={list(values)!r}: each must be >= 0 (or None for no invocation)")
        return cls(torch.tensor(ints, dtype=torch.long, device=device), min(ints, default=0), max(ints, default=0))


def invocation_offsets(input_ids: torch.Tensor, tokens: Sequence[int]) -> list[int | None]:
    """Per row of ``input_ids: (batch, T)``, ``T - start`` of the *last* occurrence of ``tokens`` (``None`` where
    it does not occur): PEFT's ``alora_offsets``, always ``>= len(tokens)`` when found.

    All windows of ``len(tokens)`` ids are compared at once (``unfold``); the last match is the first one of
    the reversed match matrix.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    batch, length = ids.shape
    n = len(tokens)
    if n == 0 or n > length:
        return [None] * batch
    want = torch.tensor(list(tokens), dtype=ids.dtype, device=ids.device)
    match = (ids.unfold(1, n, 1) == want).all(-1)                          # (batch, T - n + 1)
    found = match.any(1)
    last = (length - n) - match.flip(1).to(torch.int8).argmax(1)           # start of the last match
    return [length - int(s) if f else None for s, f in zip(last.tolist(), found.tolist())]


def calculate_alora_offsets(peft_config: dict[str, Any], active_adapter: str, input_ids: torch.Tensor | None,
                            adapter_names: Sequence[str] | None = None) -> list[int | None]:
    """PEFT's ``calculate_alora_offsets``: per row of ``input_ids: (batch, T)``, ``T - start`` of the last
    occurrence of its adapter's ``alora_invocation_tokens`` (``None`` where it does not occur).

    Row ``i`` uses ``adapter_names[i]`` when given (rows past its end, or all rows without it, use
    ``active_adapter``); ``"__base__"``, an adapter whose config has no invocation tokens (plain LoRA), and a
    name ``peft_config`` lacks (a warning, as PEFT's) give ``None``: that row is not aLoRA-masked. Rows that
    share an adapter are searched together. ``input_ids=None`` gives ``[]``.
    """
    if input_ids is None:
        return []
    batch = input_ids.shape[0]
    offsets: list[int | None] = [None] * batch
    rows_of: dict[str, list[int]] = {}
    for i in range(batch):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active_adapter
        if name == "__base__":
            continue
        if name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.",
                          PeftWarning, stacklevel=2)
            continue
        if getattr(peft_config[name], "alora_invocation_tokens", None) is not None:
            rows_of.setdefault(name, []).append(i)
    for name, rows in rows_of.items():
        found = invocation_offsets(input_ids[rows], peft_config[name].alora_invocation_tokens)
        for i, offset in zip(rows, found):
            offsets[i] = offset
    return offsets


def _rows_for(offsets: Offsets, batch: int) -> torch.Tensor:
    """The offsets of ``batch`` rows: ``generate()`` expands each input row ``batch / n`` times in place
    (``num_beams``, ``num_return_sequences``), so each offset is repeated the same way."""
    n = offsets.rows.shape[0]
    if batch == n:
        return offsets.rows
    if n == 0 or batch % n:
        raise ConfigError(f"aLoRA offsets were computed for {n} rows but a layer sees a batch of {batch}; pass "
                          "input_ids (or alora_offsets) with one entry per row")
    return offsets.rows.repeat_interleave(batch // n)


def masked_delta(layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, offsets: Offsets | None
                 ) -> torch.Tensor:
    """``result`` plus adapter ``name``'s ``s · B A dropout(x)`` on the positions from each row's invocation on.

    Shapes: ``x: (batch, ..., in)``, ``result: (batch, ..., out)``; the middle axes are the ``T'`` positions
    (one for a 2-D ``x``). Row ``i`` adapts positions ``t >= T' - min(offset_i, T')``. Only the last
    ``min(longest, T')`` positions are computed (a long prompt before the invocation costs nothing); the rest of
    ``result`` is returned untouched, so those outputs equal the base's bit for bit.
    """
    if offsets is None or offsets.longest == 0:
        return result  # no offsets (the inner model called directly) or no row invoked: the base, as PEFT
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])                                 # (batch, T', in)
    out3 = result.reshape(batch, x3.shape[1], -1)                          # (batch, T', out)
    length = x3.shape[1]
    n = min(offsets.longest, length)                                       # positions any row adapts
    tail = x3[:, length - n:].to(lora_a.weight.dtype)                      # (batch, n, in)
    delta = lora_b(lora_a(layer.lora_dropout[name](tail))) * layer.scaling[name]  # (batch, n, out)
    if offsets.shortest < n:  # some row starts later than the slice (or never): zero its earlier positions
        start = n - _rows_for(offsets, batch).to(x.device).clamp(max=n)    # (batch,) first adapted index
        keep = torch.arange(n, device=x.device)[None, :] >= start[:, None]  # (batch, n)
        delta = delta * keep[..., None].to(delta.dtype)
    # added in the wider of the two dtypes, then rounded once to the base's (an fp32 adapter over a bf16 base)
    tail_out = (out3[:, length - n:] + delta).to(out3.dtype)
    out3 = tail_out if n == length else torch.cat([out3[:, :length - n], tail_out], dim=1)
    return out3.reshape(result.shape)


class Alora(LoraVariant):
    """aLoRA as a LoRA variant: plain ``A, B`` (no tensors of its own), applied after the layer's other adapters
    and only from each row's invocation on (:func:`masked_delta`); never merged (:data:`MERGE_REFUSAL`)."""

    flag: ClassVar[str] = "use_alora"
    config_field: ClassVar[str] = "alora_invocation_tokens"
    label: ClassVar[str] = "aLoRA"
    merge_refusal: ClassVar[str | None] = MERGE_REFUSAL
    after_others: ClassVar[bool] = True

    @classmethod
    def check_target(cls, layer: nn.Module, module_name: str) -> None:
        """Linear layers only, as PEFT."""
        if type(layer) is not LoraLinear:
            raise ConfigError(f"aLoRA (alora_invocation_tokens) adapts Linear layers only, not {module_name} "
                              f"({type(layer.get_base_layer()).__name__}); leave it out of target_modules")

    @classmethod
    def for_layer(cls, layer: nn.Module) -> LoraVariant:
        cls.check_target(layer, "this layer")
        return cls()

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the update of adapter ``name`` from each row's invocation on, with the offsets
        :func:`activated` left on the layer (none: ``result`` unchanged). ``x: (batch, ..., in)`` raw."""
        offsets = getattr(layer, "alora_offsets", None) or {}
        return masked_delta(layer, name, x, result, offsets.get(name))


def alora_forward(layer: nn.Module, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA Linear layer's output with the active aLoRA adapters ``names`` masked to their invocations.

    The layer's own ``forward`` runs first with only its other active adapters (ordinary LoRA keeps its fused
    path), then each aLoRA adapter adds its masked update (:func:`masked_delta`). (The layer does this itself for
    adapters whose variant is :class:`Alora`; kept for callers of this function.)
    """
    active = layer.active_adapters
    layer.active_adapters = [n for n in active if n not in names]
    try:
        result = layer.forward(x, *args, **kwargs)
    finally:
        layer.active_adapters = active
    offsets = getattr(layer, "alora_offsets", None) or {}
    for name in names:
        result = masked_delta(layer, name, x, result, offsets.get(name))
    return result


def _input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


@contextlib.contextmanager
def activated(model: nn.Module, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None = None
              ) -> Iterator[None]:
    """For one ``forward``/``generate`` call of ``model`` (a ``PeftModel``): put each active aLoRA adapter's
    :class:`Offsets` on the layers holding aLoRA adapters, computed from the call's ``input_ids`` (or given as
    ``alora_offsets=[...]``, one per row, which this pops from ``kwargs`` as PEFT does).

    In training with gradients the offsets stay on the layers after the call (until the next call replaces them),
    since gradient checkpointing runs each decoder layer's forward again during ``backward()``.

    Raises:
        ConfigError: only ``inputs_embeds`` were given (PEFT warns and silently runs the base model; here the
            invocation cannot be found, so the call is refused), an encoder-decoder model, or a mixed-adapter
            batch (``adapter_names``) naming an aLoRA adapter (not implemented yet).
    """
    given = kwargs.pop("alora_offsets", None)
    configs = model.peft_config
    mixed = sorted({n for n in adapter_names or () if getattr(configs.get(n), "alora_invocation_tokens", None)})
    if mixed:
        raise ConfigError(f"adapter_names names the aLoRA adapter(s) {mixed}: mixed-adapter batches with aLoRA are "
                          "not implemented in deltatune yet; run each aLoRA adapter in its own batch (set_adapter)")
    names = [n for n in model.active_adapters if getattr(configs.get(n), "alora_invocation_tokens", None)]
    if not names:
        yield
        return
    if getattr(getattr(model.get_base_model(), "config", None), "is_encoder_decoder", False):
        raise ConfigError("aLoRA (alora_invocation_tokens) works on decoder-only (causal LM) models: the "
                          "invocation in the encoder input says nothing about decoder positions")
    ids = _input_ids(args, kwargs)
    device = next(model.parameters()).device
    if given is not None:
        if isinstance(given, torch.Tensor):
            given = given.tolist()
        offsets = {n: Offsets.from_list(list(given), device) for n in names}
    elif ids is None:
        raise ConfigError("aLoRA needs input_ids to find the invocation tokens; with inputs_embeds pass "
                          "alora_offsets=[...] too (per row: tokens from the invocation's start to the end, "
                          "or None to run the base model for that row)")
    else:
        offsets = {n: Offsets.from_list(invocation_offsets(ids, configs[n].alora_invocation_tokens), device)
                   for n in names}
    layers = [m for m in model.modules()
              if any(isinstance(v, Alora) for v in getattr(m, "lora_variant", {}).values())]
    for layer in layers:
        layer.alora_offsets = offsets
    try:
        yield
    finally:
        if not (model.training and torch.is_grad_enabled()):
            for layer in layers:
                layer.alora_offsets = None
