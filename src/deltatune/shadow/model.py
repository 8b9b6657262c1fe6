"""The model-level half of ShadowPEFT: the shadow backbone that gives ``s⁽⁰⁾``, and the runtime that seeds it.

``s⁽⁰⁾ = P(B(x)): (B, T, d)``: the backbone ``B`` (``shadow_backbone``; by default a 1-layer decoder of the base
model's own class, fed the base model's frozen input embeddings) and the projection ``P`` (``shadow_projection``:
``nn.Linear(d_shadow, d)`` without bias when the widths differ, else the identity). Both are per adapter and held
once per model, on the tuner (PEFT's file keys ``base_model.shadow_backbone.default....``).

:class:`ShadowRuntime` carries the shadow state through one forward of the model: a pre-hook on the model computes
``s⁽⁰⁾`` from the raw inputs (token ids and the 2-D attention mask exist only there) and splits a
:class:`~deltatune.shadow.cache.ShadowCache`; each adapted block reads and advances ``runtime.shadow``; a hook after
the model packs both caches into one and, given ``labels``, adds the auxiliary shadow loss (Eq. 8-9)::

    L = L_task + λ · CE(head(s⁽⁰⁾), y)

with ``head`` the model's frozen output layer (causal LM: next-token cross-entropy on shifted labels) or a trained
copy of its classifier (sequence classification: the last non-padding token).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.shadow.cache import ShadowCache
from deltatune.shadow.config import ShadowConfig
from deltatune.shadow.layer import ShadowLayer

_STACKS = ("layers", "h")  # the decoder blocks' ModuleList in transformers' decoder-only models


def is_diffusion_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers transformer (its blocks in ``transformer_blocks``, no ``layers``)."""
    return isinstance(getattr(model, "single_transformer_blocks", None), nn.ModuleList) or (
        isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)
        and not isinstance(getattr(model, "layers", None), nn.ModuleList))


def _has_stack(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, a, None), nn.ModuleList) for a in _STACKS)


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The module holding the decoder blocks (``LlamaModel`` in ``LlamaForCausalLM``, GPT-2's ``transformer``, OPT's
    ``model.decoder``), PEFT's search.

    Raises:
        ConfigError: none found (PEFT's sentence first).
    """
    for attr in ("model", "transformer", "base_model", "decoder"):
        backbone = getattr(model, attr, None)
        if not isinstance(backbone, nn.Module):
            continue
        nested = getattr(backbone, "decoder", None)
        if isinstance(nested, nn.Module) and _has_stack(nested):
            return nested
        return backbone
    if _has_stack(model):
        return model
    raise ConfigError("Unable to automatically locate the transformer backbone inside the supplied model (required "
                      "when `target_modules` is not set). Please set `target_modules` explicitly to the decoder "
                      "blocks you want to wrap, e.g. `r'.*\\.layers\\.\\d+$'`.")


def decoder_blocks(backbone: nn.Module) -> tuple[nn.ModuleList, str]:
    """``(blocks, attribute name)`` of the backbone's decoder blocks."""
    for attr in _STACKS:
        blocks = getattr(backbone, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks, attr
    raise ConfigError("Unable to automatically find a `nn.ModuleList` of decoder layers (expected `.layers`/`.h`) "
                      "inside the backbone (required when `target_modules` is not set). Please set `target_modules` "
                      "explicitly to the decoder blocks you want to wrap, e.g. `r'.*\\.layers\\.\\d+$'`.")


def hidden_size_of(config: Any) -> int:
    """The model width ``d`` from a transformers config (``hidden_size``, GPT-2's ``n_embd``, ``d_model``)."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ConfigError("Unable to infer the hidden size from the model config.")


def default_targets(model: nn.Module) -> set[str]:
    """Every decoder block by name (PEFT's default: the blocks must be contiguous in its implementation)."""
    backbone = decoder_backbone(model)
    blocks, attr = decoder_blocks(backbone)
    prefix = next((name for name, module in model.named_modules() if module is backbone), "")
    base = f"{prefix}.{attr}" if prefix else attr
    return {f"{base}.{i}" for i in range(len(blocks))}


# ---- building the backbone ---------------------------------------------------------------------------------------
def _set_config_attr(config: Any, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise ConfigError(f"Unable to update the model config: none of the expected attributes {names} are defined. "
                      'This is required when building a mirrored shadow backbone (`shadow_model="mirror"`). Please '
                      "use a supported decoder architecture, or set `shadow_model` to a pretrained model id/path "
                      "instead.")


def _fit_layer_lists(config: Any) -> None:
    """Per-layer config lists sized for the base (Qwen3's ``layer_types``, ``max_window_layers``) cut or padded to
    the mirror's depth, as PEFT does, so the smaller model can be built."""
    try:
        depth = int(config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        kinds = list(kinds) or ["full_attention"] * depth
        config.layer_types = kinds[:depth] + [kinds[-1]] * max(0, depth - len(kinds))
    window = getattr(config, "max_window_layers", None)
    if window is not None:
        with contextlib.suppress(TypeError, ValueError):
            if int(window) > depth:
                config.max_window_layers = depth


def mirror_backbone(model: nn.Module, config: ShadowConfig) -> nn.Module:
    """A fresh decoder of the base decoder's class: the base config with ``shadow_num_hidden_layers`` (default 1)
    and the other ``shadow_*`` overrides."""
    base = decoder_backbone(model)
    cfg = deepcopy(base.config)
    _set_config_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"), config.shadow_num_hidden_layers or 1)
    if config.shadow_hidden_size is not None:
        _set_config_attr(cfg, ("hidden_size", "n_embd", "d_model"), config.shadow_hidden_size)
    if config.shadow_intermediate_size is not None:
        _set_config_attr(cfg, ("intermediate_size", "ffn_dim", "n_inner"), config.shadow_intermediate_size)
    if config.shadow_num_attention_heads is not None:
        _set_config_attr(cfg, ("num_attention_heads", "n_head", "num_heads"), config.shadow_num_attention_heads)
    _fit_layer_lists(cfg)
    return type(base)(cfg)


def pretrained_backbone(source: str) -> tuple[nn.Module, nn.Module | None]:
    """``(backbone, trained projection or None)`` from a transformers checkpoint (a local path or hub id): a plain
    one through ``AutoModel``; a "projected" one (``model_type == "causal_lm_with_hidden_projection"``) as its
    ``shadow_model.*`` backbone and ``shadow_hidden_projection.weight``."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    with open(cached_file(source, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") != "causal_lm_with_hidden_projection":
        return AutoModel.from_pretrained(source), None
    from safetensors.torch import load_file

    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    weights = load_file(cached_file(source, "model.safetensors"))
    backbone.load_state_dict({k.removeprefix("shadow_model."): v for k, v in weights.items()
                              if k.startswith("shadow_model.")}, strict=True)
    weight = weights.get("shadow_hidden_projection.weight")
    if weight is None:
        raise ConfigError(f"'{source}' is a projected shadow checkpoint but has no 'shadow_hidden_projection.weight'.")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.weight.data = weight.to(projection.weight.dtype)
    return backbone, projection


def build_shadow(model: nn.Module, config: ShadowConfig) -> tuple[nn.Module, nn.Module, nn.Module | None, bool]:
    """``(backbone, projection, head or None, share_embeddings)`` for one adapter, in PEFT's order (the same draws
    under one seed), on the base's device and in its dtype.

    Raises:
        ConfigError: a loaded projection that does not map the shadow width to the base width.
    """
    loaded_projection = None
    if config.shadow_model == "mirror":
        backbone = mirror_backbone(model, config)
    else:
        backbone, loaded_projection = pretrained_backbone(config.shadow_model)
    base_width, shadow_width = hidden_size_of(model.config), hidden_size_of(backbone.config)
    if loaded_projection is not None:
        if (loaded_projection.in_features, loaded_projection.out_features) != (shadow_width, base_width):
            raise ConfigError(f"The loaded shadow projection maps {loaded_projection.in_features}->"
                              f"{loaded_projection.out_features}, but the shadow/base hidden sizes are "
                              f"{shadow_width}/{base_width}.")
        projection = loaded_projection
    elif shadow_width != base_width:
        projection = nn.Linear(shadow_width, base_width, bias=False)
    else:
        projection = nn.Identity()
    try:
        takes_embeds = "inputs_embeds" in inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        takes_embeds = False
    share = (config.share_embeddings and config.shadow_model == "mirror" and takes_embeds
             and shadow_width == base_width)
    if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
        del backbone.embed_tokens  # it reads the base's embeddings instead (PEFT drops `embed_tokens` only)
    head = None
    if str(config.task_type) == "SEQ_CLS":
        head = next((deepcopy(m) for m in (getattr(model, a, None) for a in ("score", "classifier"))
                     if isinstance(m, nn.Module)), None)
    param = next(model.parameters(), None)
    if param is not None:
        for module in (backbone, projection, head):
            if module is not None:
                module.to(device=param.device, dtype=param.dtype)
    return backbone, projection, head, share


def embedding_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """The input and output embeddings of a loaded backbone (they stay frozen: training a vocabulary table is not
    parameter-efficient, PEFT's rule)."""
    out: list[nn.Parameter] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(Exception):
            module = getattr(backbone, getter)()
            if isinstance(module, nn.Module):
                out += list(module.parameters())
    return out


# ---- the auxiliary loss ------------------------------------------------------------------------------------------
def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits: (B, T, V)`` at ``t`` against ``labels: (B, T)`` at ``t + 1`` (-100
    ignored), the mean over the kept tokens."""
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous().to(logits.device)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, d)``: each row's last non-padding position (left or right padding)."""
    if attention_mask is None:
        return hidden[:, -1, :]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' sequence-classification loss: MSE for one label, cross-entropy for class ids, else BCE."""
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


# ---- the runtime -------------------------------------------------------------------------------------------------
_CACHE_KEYS = ("cache", "past_key_values")  # transformers 5's name, then the deprecated one


class ShadowRuntime:
    """The shadow state of one forward, the model hooks that seed and finish it, per model (the tuner's).

    Attributes:
        shadow: The current shadow state ``(B, T, d)`` while the model runs (``None`` outside, or when the shadow
            path is off: adapters disabled, or the active adapter has no backbone).
        seed: ``s⁽⁰⁾`` of the current forward (the auxiliary loss reads it).
        last_shadow_loss: The unweighted auxiliary loss of the last forward with labels, detached (PEFT's).
    """

    def __init__(self, adapter_model: nn.Module) -> None:
        self.adapter_model = adapter_model
        self.shadow: torch.Tensor | None = None
        self.seed: torch.Tensor | None = None
        self.last_shadow_loss: torch.Tensor | None = None
        self.share: dict[str, bool] = {}        # adapter -> the backbone reads the base's input embeddings
        self.pretrained: dict[str, list[nn.Parameter]] = {}  # adapter -> frozen embeddings of a loaded backbone
        self._pending: Any = None              # the backbone caches to pack after the forward
        self._pack = False
        self._mixed = False                    # this forward is a mixed-adapter batch
        self._handles: list[Any] = []

    # ---- hooks -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the two model hooks (once)."""
        if self._handles:
            return
        model = self.adapter_model.model
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def release(self, layer: ShadowLayer | None = None) -> None:
        """Remove the model hooks once no shadow layer (other than ``layer``, on its way out) is left."""
        if any(m is not layer for m in self.layers()):
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.shadow = self.seed = None

    def layers(self) -> list[ShadowLayer]:
        return [m for m in self.adapter_model.model.modules() if isinstance(m, ShadowLayer)]

    def freeze_pretrained_embeddings(self) -> None:
        for params in self.pretrained.values():
            for p in params:
                p.requires_grad_(False)

    def _entry(self) -> ShadowLayer | None:
        """The first shadow layer when the shadow path is on for this call (adapters enabled, and a mixed batch or an
        active adapter with a backbone), else ``None``."""
        layers = self.layers()
        if not layers or layers[0].disable_adapters:
            return None
        active = self.adapter_model.active_adapters
        if layers[0].row_adapters is not None or (active and active[0] in self.adapter_model.shadow_backbone):
            return layers[0]
        return None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Seed ``s⁽⁰⁾`` from the raw inputs; hand the base model its own half of a ``ShadowCache``."""
        self.shadow = self.seed = None
        self._pending, self._pack, self._mixed = None, False, False
        key = next((k for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        past, shadow_past = (kwargs[key] if key else None), None
        if isinstance(past, ShadowCache):
            past, shadow_past = past.base, past.shadow
            kwargs = {**kwargs, key: past}
        entry = self._entry()
        if entry is None:
            return args, kwargs
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(getattr(module, "config", None), "use_cache", False))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            raise ConfigError("ShadowPEFT seeds its shadow state from `input_ids` or `inputs_embeds`; the model was "
                              "called with neither")
        if shadow_past is None and past is not None and past.get_seq_length() > 0:
            raise ConfigError("the model was given a key/value cache without the shadow backbone's: pass back the "
                              "ShadowCache the model returned (as generate() does), not its base half")
        inputs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds,
                  "attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids")}
        self._mixed = entry.row_adapters is not None
        if not self._mixed:
            self.seed, self._pending = self._seed(self.adapter_model.active_adapters[0], inputs, shadow_past,
                                                  use_cache)
        else:
            batch = next(v for v in (input_ids, inputs_embeds) if v is not None).shape[0]
            # one name per row (generate() may have repeated each input row)
            self.seed, self._pending = self._seed_rows(entry._row_names(batch), inputs, shadow_past, use_cache)
        self.shadow, self._pack = self.seed, bool(use_cache)
        return args, kwargs

    def _seed(self, adapter_name: str, inputs: dict[str, Any], past: Any, use_cache: bool
              ) -> tuple[torch.Tensor, Any]:
        """``(s⁽⁰⁾ = P(B(x)), the backbone's cache)`` for ``adapter_name``."""
        backbone = self.adapter_model.shadow_backbone[adapter_name]
        input_ids, inputs_embeds = inputs["input_ids"], inputs["inputs_embeds"]
        kwargs: dict[str, Any] = {"attention_mask": inputs["attention_mask"], "use_cache": use_cache,
                                  "return_dict": True, "cache": past}
        if inputs["position_ids"] is not None:
            kwargs["position_ids"] = inputs["position_ids"]
        share = self.share.get(adapter_name, False)
        if share and inputs_embeds is None:
            inputs_embeds = self.adapter_model.model.get_input_embeddings()(input_ids)
        if inputs_embeds is not None:
            out = backbone(inputs_embeds=inputs_embeds, **kwargs)
        else:
            out = backbone(input_ids=input_ids, **kwargs)
        if not hasattr(out, "last_hidden_state"):
            raise ConfigError("The shadow backbone did not return a `last_hidden_state`; architecture is "
                              "unsupported.")
        state = self.adapter_model.shadow_projection[adapter_name](out.last_hidden_state)
        return state, (getattr(out, "cache", None) if use_cache else None)

    def _seed_rows(self, names: list[str], inputs: dict[str, Any], past: Any, use_cache: bool
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A mixed batch: each row's ``s⁽⁰⁾`` from its own adapter's backbone (rows of ``"__base__"``: zeros, never
        read); the caches per adapter (each holds its rows only)."""
        first = next(v for v in (inputs["input_ids"], inputs["inputs_embeds"]) if v is not None)
        batch = first.shape[0]
        past = past or {}
        state, caches = None, {}
        for name in dict.fromkeys(names):
            if name not in self.adapter_model.shadow_backbone:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=first.device)
            part = {k: (v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) and v.shape[0] == batch
                        else v) for k, v in inputs.items()}
            seed, caches[name] = self._seed(name, part, past.get(name), use_cache)
            if state is None:
                state = seed.new_zeros((batch, *seed.shape[1:]))
            state = state.index_copy(0, rows.to(seed.device), seed)
        return state, caches

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Pack the caches into a ``ShadowCache``; add ``λ · L_shadow`` to the loss when ``labels`` were given."""
        seed, self.shadow, self.seed = self.seed, None, None
        pending, self._pending = self._pending, None
        if seed is None:
            return output
        if self._pack:
            self._pack = False
            key = next((k for k in _CACHE_KEYS if getattr(output, k, None) is not None), None)
            if key is not None:
                setattr(output, key, ShadowCache(base=getattr(output, key), shadow=pending))
        labels = kwargs.get("labels")
        if labels is None or getattr(output, "loss", None) is None or self._mixed:
            return output  # (a mixed batch, eval only, has no single shadow head to score)
        loss = self.auxiliary_loss(seed, labels, kwargs.get("attention_mask"))
        if loss is None:
            return output
        self.last_shadow_loss = loss.detach()
        output.shadow_loss = self.last_shadow_loss
        weight = self.adapter_model.peft_config[self.adapter_model.active_adapters[0]].auxiliary_loss_weight
        if weight > 0:
            output.loss = output.loss + weight * loss
        return output

    def auxiliary_loss(self, seed: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None
                       ) -> torch.Tensor | None:
        """Eq. 8: the shadow path's own task loss on ``s⁽⁰⁾`` (unweighted), ``None`` without a head (task types
        other than causal LM and sequence classification)."""
        name = self.adapter_model.active_adapters[0]
        heads = self.adapter_model._modules.get("shadow_head")
        if heads is not None and name in heads:
            return classification_loss(heads[name](last_token(seed, attention_mask)), labels)
        if str(self.adapter_model.peft_config[name].task_type) != "CAUSAL_LM":
            return None
        return shifted_cross_entropy(self.adapter_model.model.get_output_embeddings()(seed), labels)


__all__ = ["ShadowRuntime", "build_shadow", "decoder_backbone", "decoder_blocks", "default_targets",
           "hidden_size_of", "is_diffusion_transformer"]
